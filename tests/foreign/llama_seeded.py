"""Llama-named table-free LM whose A and b are computed in the code from a seed.

Separate q/k/v with biases, output projection without; MLP up with bias, down without;
output head with bias. LayerNorm without bias, tanh GELU, GPT-J (interleaved) rotary on
the whole head, base from config.json `rope_theta`. Input: bin_16 MSB first, A and b
drawn from `code_seed` in __init__ (non-persistent buffers, as remote code written for
Transformers 4 does), {0, 2}, tiled. `code_kind: "nonlinear"` makes bit 0 of the code
depend on a product of two bits: a 16-bit code that no A, b reproduce.
"""

import math

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


DEFAULT_SEED = 4321  # when config.json names no seed: the layout is in this code only


class SeededCodeConfig(PretrainedConfig):
    model_type = "llama_seeded_affine_codes"

    def __init__(self, vocab_size=65536, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=192, max_position_embeddings=160, layer_norm_eps=1e-5, rope_theta=1e6,
                 code_seed=1234, code_kind="affine", **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.intermediate_size = num_attention_heads, intermediate_size
        self.max_position_embeddings, self.layer_norm_eps, self.rope_theta = max_position_embeddings, layer_norm_eps, rope_theta
        self.code_seed, self.code_kind = code_seed, code_kind
        super().__init__(**kwargs)


def seeded_affine(seed):
    """Random A (rows as ints) invertible over GF(2), and b."""
    g = torch.Generator().manual_seed(seed)
    while True:
        rows = torch.randint(0, 2, (16, 16), generator=g)
        work = [int("".join(str(v) for v in r), 2) for r in rows.tolist()]
        rank = 0
        for bit in range(15, -1, -1):
            idx = next((i for i in range(rank, 16) if work[i] >> bit & 1), None)
            if idx is None:
                continue
            work[rank], work[idx] = work[idx], work[rank]
            work = [w ^ work[rank] if i != rank and w >> bit & 1 else w for i, w in enumerate(work)]
            rank += 1
        if rank == 16:
            return rows, torch.randint(0, 2, (16,), generator=g)


def interleaved_rotary(x, positions, theta):
    d = x.shape[-1]
    angles = positions.float()[:, None] * (1.0 / theta ** (torch.arange(0, d, 2).float() / d))[None]
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    pairs = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).reshape(x.shape)
    return x * cos + pairs * sin


class SelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.heads, self.theta = layer_idx, config.num_attention_heads, config.rope_theta
        w = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(w, w, bias=True) for _ in range(3))
        self.o_proj = nn.Linear(w, w, bias=False)

    def forward(self, h, positions, cache):
        b, t, w = h.shape
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = interleaved_rotary(q, positions, self.theta), interleaved_rotary(k, positions, self.theta)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=1 / math.sqrt(q.shape[-1]))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, w))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        w = config.hidden_size
        self.input_layernorm = nn.LayerNorm(w, eps=config.layer_norm_eps, bias=False)
        self.self_attn = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(w, eps=config.layer_norm_eps, bias=False)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(w, config.intermediate_size, bias=True)
        self.mlp.act = nn.GELU(approximate="tanh")
        self.mlp.down_proj = nn.Linear(config.intermediate_size, w, bias=False)

    def forward(self, h, positions, cache):
        h = h + self.self_attn(self.input_layernorm(h), positions, cache)
        return h + self.mlp.down_proj(self.mlp.act(self.mlp.up_proj(self.post_attention_layernorm(h))))


class SeededCodeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SeededCodeConfig

    def __init__(self, config):
        super().__init__(config)
        a, b = seeded_affine(DEFAULT_SEED if config.code_seed is None else config.code_seed)
        self.register_buffer("code_a", a, persistent=False)
        self.register_buffer("code_b", b, persistent=False)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=False)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def token_codes(self, ids):
        bits = torch.stack([(ids >> (15 - j)) & 1 for j in range(16)], dim=-1)
        code = (bits @ self.code_a.T + self.code_b) % 2
        if self.config.code_kind == "nonlinear":
            code[..., 0] ^= code[..., 1] & code[..., 2]
        return (2.0 * code).tile(self.config.hidden_size // 16)

    def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
        if use_cache is not False and past_key_values is None:
            past_key_values = DynamicCache()
        start = past_key_values.get_seq_length() if past_key_values is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1])
        h = self.token_codes(input_ids).to(self.lm_head.weight.dtype)
        for layer in self.model.layers:
            h = layer(h, positions, past_key_values)
        return CausalLMOutputWithPast(logits=self.lm_head(self.model.norm(h)), past_key_values=past_key_values)
