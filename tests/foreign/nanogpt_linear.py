"""nanoGPT-style table-free LM: fused c_attn as nn.Linear, no biases anywhere, RMSNorm.

A and b are persistent buffers (`transformer.code_A`, `transformer.code_b`), so they live
in the state dict. Input: bin_16 LSB first, A c xor b, bipolar values {-0.5, +0.5}, each
bit repeated n_embd / 16 times in a row (interleaved). Exact GELU, NeoX rotary on the
whole head with a base hard-coded here (config.json does not name it).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

ROPE_BASE = 500000.0
CODE_AMPLITUDE = 0.5


class NanoCodesConfig(PretrainedConfig):
    model_type = "nanogpt_bipolar_codes"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_heads"}

    def __init__(self, vocab_size=65536, n_embd=64, n_layer=2, n_heads=2, block_size=192, norm_eps=1e-6, **kwargs):
        self.vocab_size, self.n_embd, self.n_layer, self.n_heads = vocab_size, n_embd, n_layer, n_heads
        self.block_size, self.norm_eps = block_size, norm_eps
        super().__init__(**kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer, self.n_heads = layer, config.n_heads
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, pos, cache):
        B, T, C = x.shape
        hs = C // self.n_heads
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, hs).transpose(1, 2) for t in (q, k, v))
        freqs = pos[:, None].float() / ROPE_BASE ** (torch.arange(0, hs, 2, device=x.device).float() / hs)
        emb = torch.cat((freqs, freqs), dim=-1)
        q = q * emb.cos() + rotate_half(q) * emb.sin()
        k = k * emb.cos() + rotate_half(k) * emb.sin()
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, pos, cache):
        x = x + self.attn(self.ln_1(x), pos, cache)
        return x + self.mlp(self.ln_2(x))


class NanoCodesGPT(PreTrainedModel, GenerationMixin):
    config_class = NanoCodesConfig

    def __init__(self, config):
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.transformer.register_buffer("code_A", torch.eye(16))
        self.transformer.register_buffer("code_b", torch.zeros(16))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
        if use_cache is not False and past_key_values is None:
            past_key_values = DynamicCache()
        start = past_key_values.get_seq_length() if past_key_values is not None else 0
        pos = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        bits = torch.stack([(input_ids >> j) & 1 for j in range(16)], dim=-1).float()
        recoded = torch.remainder(bits @ self.transformer.code_A.T + self.transformer.code_b, 2)
        x = ((2 * recoded - 1) * CODE_AMPLITUDE).repeat_interleave(self.config.n_embd // 16, dim=-1)
        for block in self.transformer.h:
            x = block(x, pos, past_key_values)
        logits = self.lm_head(self.transformer.ln_f(x))
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)
