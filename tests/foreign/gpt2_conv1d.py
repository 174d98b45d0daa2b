"""GPT-2-style table-free LM shaped like the published checkpoint's likely remote code.

Our model_type, GPT-2 names with Conv1D (weights stored (in, out)), fused c_attn, the
causal mask kept as a persistent `attn.bias` buffer (old GPT-2), LayerNorm with bias,
tanh GELU, GPT-J rotary on half of each head. Input: bin_16 MSB first, recoded by A and b
given in config.json, {0, 1}, tiled to the width.
"""

import math

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


class AffineCodeGPTConfig(PretrainedConfig):
    model_type = "model_binary_affine_code_n_layer_32"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}

    def __init__(self, vocab_size=65536, n_embd=64, n_layer=2, n_head=2, n_positions=256, layer_norm_epsilon=1e-5,
                 rotary_dim=16, rotary_base=10000.0, affine_A=None, affine_b=None, **kwargs):
        self.vocab_size, self.n_embd, self.n_layer, self.n_head = vocab_size, n_embd, n_layer, n_head
        self.n_positions, self.layer_norm_epsilon = n_positions, layer_norm_epsilon
        self.rotary_dim, self.rotary_base = rotary_dim, rotary_base
        self.affine_A = affine_A or [[int(i == j) for j in range(16)] for i in range(16)]
        self.affine_b = affine_b or [0] * 16
        super().__init__(**kwargs)


class Conv1D(nn.Module):
    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, config, index):
        super().__init__()
        self.index, self.n_head, self.rotary_dim = index, config.n_head, config.rotary_dim
        self.head_dim = config.n_embd // config.n_head
        n = config.n_positions
        self.register_buffer("bias", torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n))
        self.c_attn = Conv1D(3 * config.n_embd, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        inv = 1.0 / config.rotary_base ** (torch.arange(0, config.rotary_dim, 2).float() / config.rotary_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def rotate(self, x, positions):
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        sin, cos = angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)
        r = self.rotary_dim
        return torch.cat([x[..., :r] * cos + rotate_every_two(x[..., :r]) * sin, x[..., r:]], dim=-1)

    def forward(self, x, positions, cache):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for z in self.c_attn(x).split(x.shape[-1], -1))
        q, k = self.rotate(q, positions), self.rotate(k, positions)
        if cache is not None:
            k, v = cache.update(k, v, self.index)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        s = k.shape[2]
        scores = scores.masked_fill(~self.bias[:, :, s - t : s, :s], torch.finfo(scores.dtype).min)
        out = torch.softmax(scores, dim=-1) @ v
        return self.c_proj(out.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, config, index):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, index)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = nn.Module()
        self.mlp.c_fc = Conv1D(4 * config.n_embd, config.n_embd)
        self.mlp.c_proj = Conv1D(config.n_embd, 4 * config.n_embd)

    def forward(self, x, positions, cache):
        x = x + self.attn(self.ln_1(x), positions, cache)
        return x + self.mlp.c_proj(gelu_new(self.mlp.c_fc(self.ln_2(x))))


class AffineCodeGPTLMHeadModel(PreTrainedModel, GenerationMixin):
    config_class = AffineCodeGPTConfig

    def __init__(self, config):
        super().__init__(config)
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.transformer.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def codes(self, ids):
        bits = torch.stack([(ids >> (15 - j)) & 1 for j in range(16)], dim=-1)
        a = torch.tensor(self.config.affine_A, device=ids.device)
        b = torch.tensor(self.config.affine_b, device=ids.device)
        recoded = (bits @ a.T + b) % 2
        return recoded.float().repeat(1, 1, self.config.n_embd // 16)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        if use_cache is not False and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        x = self.codes(input_ids).to(self.lm_head.weight.dtype)
        for block in self.transformer.h:
            x = block(x, positions, past_key_values)
        logits = self.lm_head(self.transformer.ln_f(x))
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)
