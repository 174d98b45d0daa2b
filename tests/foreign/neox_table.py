"""The learned-table baseline in GPT-NeoX layout: an input embedding table, no codes.

gpt_neox.embed_in (the table), fused attention.query_key_value laid out per head
([q_h, k_h, v_h] for each head h), sequential residual (not NeoX's parallel one),
LayerNorm with bias, exact GELU (erf), NeoX rotary on a quarter of each head
(`rotary_pct`, `rotary_emb_base`), untied head `embed_out` without bias.
"""

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


class TableBaselineConfig(PretrainedConfig):
    model_type = "baseline_learned_input_table"

    def __init__(self, vocab_size=65536, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=256, max_position_embeddings=128, layer_norm_eps=1e-5, rotary_pct=0.25,
                 rotary_emb_base=10000, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.intermediate_size = num_attention_heads, intermediate_size
        self.max_position_embeddings, self.layer_norm_eps = max_position_embeddings, layer_norm_eps
        self.rotary_pct, self.rotary_emb_base = rotary_pct, rotary_emb_base
        super().__init__(**kwargs)


def erf_gelu(x):
    return x * 0.5 * (1.0 + torch.erf(x / 2.0**0.5))


class Attention(nn.Module):
    def __init__(self, config, layer_number):
        super().__init__()
        self.layer_number, self.num_heads = layer_number, config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.rotary_ndims = int(self.head_size * config.rotary_pct)
        self.base = config.rotary_emb_base
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def rope(self, x, positions):
        r = self.rotary_ndims
        inv_freq = 1.0 / (self.base ** (torch.arange(0, r, 2).float() / r))
        freqs = torch.einsum("i,j->ij", positions.float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        rot, rest = x[..., :r], x[..., r:]
        half = torch.cat((-rot[..., r // 2 :], rot[..., : r // 2]), dim=-1)
        return torch.cat((rot * emb.cos() + half * emb.sin(), rest), dim=-1)

    def forward(self, hidden, positions, layer_past):
        b, t, _ = hidden.shape
        qkv = self.query_key_value(hidden).view(b, t, self.num_heads, 3 * self.head_size).permute(0, 2, 1, 3)
        q, k, v = qkv.split(self.head_size, dim=-1)
        q, k = self.rope(q, positions), self.rope(k, positions)
        if layer_past is not None:
            k, v = layer_past.update(k, v, self.layer_number)
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.head_size**0.5
        s = k.shape[2]
        causal = torch.ones(t, s, dtype=torch.bool).tril(s - t)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.dense(torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(b, t, -1))


class Layer(nn.Module):
    def __init__(self, config, layer_number):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config, layer_number)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.mlp.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden, positions, layer_past):
        hidden = hidden + self.attention(self.input_layernorm(hidden), positions, layer_past)
        mlp = self.mlp.dense_4h_to_h(erf_gelu(self.mlp.dense_h_to_4h(self.post_attention_layernorm(hidden))))
        return hidden + mlp


class TableBaselineForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TableBaselineConfig

    def __init__(self, config):
        super().__init__(config)
        self.gpt_neox = nn.Module()
        self.gpt_neox.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.gpt_neox.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.gpt_neox.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
        if use_cache is not False and past_key_values is None:
            past_key_values = DynamicCache()
        start = past_key_values.get_seq_length() if past_key_values is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1])
        hidden = self.gpt_neox.embed_in(input_ids)
        for layer in self.gpt_neox.layers:
            hidden = layer(hidden, positions, past_key_values)
        return CausalLMOutputWithPast(logits=self.embed_out(self.gpt_neox.final_layer_norm(hidden)),
                                      past_key_values=past_key_values)
