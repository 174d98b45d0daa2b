"""The table-free causal LM in plain PyTorch + Transformers.

Pre-norm decoder-only Transformer: token codes (no input table) -> N x [norm ->
rotary self-attention -> residual, norm -> GELU MLP -> residual] -> norm -> untied
linear head. The config picks the norm (LayerNorm with or without bias, RMSNorm), the
biases, the GELU variant, the rotary style and dimension, and the input (codes, or the
learned-table baseline). This file and its relative imports are copied into every saved
checkpoint, so it may import only torch, transformers and its siblings.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .codes import TokenCode, TokenCoder
from .configuration_tablefree import BinaryTableFreeConfig, TableFreeConfig


def rotary_cos_sin(positions: torch.Tensor, config: TableFreeConfig, dtype: torch.dtype):
    """cos, sin of shape (batch, seq, rotary_dim), laid out for the config's rope_style."""
    dim, theta = config.rotary_dim, config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float) / dim)
    freqs = positions[..., None].float() * inv_freq
    if config.rope_style == "neox":  # pair (i, i + dim/2)
        angles = torch.cat((freqs, freqs), dim=-1)
    else:  # gptj: pair (2i, 2i + 1)
        angles = freqs.repeat_interleave(2, dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotates the first cos.shape[-1] dims of each head; the rest pass through (partial rotary)."""
    dim = cos.shape[-1]
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    if style == "neox":
        rotated = torch.cat((-x_rot[..., dim // 2 :], x_rot[..., : dim // 2]), dim=-1)
    else:
        rotated = torch.stack((-x_rot[..., 1::2], x_rot[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def make_norm(config: TableFreeConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.norm_bias)


class TableFreeAttention(nn.Module):
    def __init__(self, config: TableFreeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.rope_style = config.rope_style
        self.is_causal = True
        width = config.hidden_size
        self.q_proj = nn.Linear(width, width, bias=config.attention_bias)
        self.k_proj = nn.Linear(width, width, bias=config.attention_bias)
        self.v_proj = nn.Linear(width, width, bias=config.attention_bias)
        self.o_proj = nn.Linear(width, width, bias=config.attention_out_bias)

    def forward(self, x, cos, sin, attention_mask, past_key_values: Cache | None) -> torch.Tensor:
        heads_shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = (proj(x).view(heads_shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = apply_rotary(q, cos, sin, self.rope_style), apply_rotary(k, cos, sin, self.rope_style)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        out, _ = sdpa_attention_forward(self, q, k, v, attention_mask, scaling=self.head_dim**-0.5)
        return self.o_proj(out.reshape(*x.shape[:-1], -1))


class TableFreeMLP(nn.Module):
    def __init__(self, config: TableFreeConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.act = ACT2FN[config.hidden_act]
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class TableFreeBlock(nn.Module):
    def __init__(self, config: TableFreeConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = TableFreeAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = TableFreeMLP(config)

    def forward(self, x, cos, sin, attention_mask, past_key_values) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention_mask, past_key_values)
        return x + self.mlp(self.post_attention_layernorm(x))


class TableFreePreTrainedModel(PreTrainedModel):
    config_class = TableFreeConfig
    base_model_prefix = "model"
    _no_split_modules = ["TableFreeBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TokenCoder):  # non-persistent buffers: rebuilt from the config, never loaded
            init.copy_(module.masks, module.mask_tensor())
            init.copy_(module.shift, module.shift_tensor())


class TableFreeModel(TableFreePreTrainedModel):
    def __init__(self, config: TableFreeConfig) -> None:
        super().__init__(config)
        if config.input_kind == "codes":
            self.codes = TokenCoder(TokenCode.from_config(config))
        else:  # the learned-table baseline
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TableFreeBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.codes if self.config.input_kind == "codes" else self.embed_tokens

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.config.input_kind == "codes":
            return self.codes(input_ids, self.norm.weight.dtype)
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        x = self.embed(input_ids)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=x,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        cos, sin = rotary_cos_sin(position_ids, self.config, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, past_key_values if use_cache else None)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), past_key_values=past_key_values)


class TableFreeForCausalLM(TableFreePreTrainedModel, GenerationMixin):
    def __init__(self, config: TableFreeConfig) -> None:
        super().__init__(config)
        self.model = TableFreeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        logits = self.lm_head(out.last_hidden_state[:, -logits_to_keep:, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


class BinaryTableFreeForCausalLM(TableFreeForCausalLM):
    """The plain-binary sibling (A = I, b = 0); a class of its own so Auto classes map both types."""

    config_class = BinaryTableFreeConfig
