"""The table-free architecture built from vLLM's own layers (tensor- and pipeline-parallel).

Mirrors model_impl/modeling_tablefree.py module for module, every config choice included
(norms, biases, GELU variant, rotary style and dimension). The input side is model_impl's
TokenCoder, so each rank computes its codes from the ids on its own device: no table, no
communication; the learned-table baseline (input_kind "table") uses VocabParallelEmbedding.
--quantization reaches every linear layer, as in vLLM's in-tree models. (No `from __future__
import annotations`: vLLM's compile decorator reads the forward's annotations at import time.)
"""


from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import LayerNorm, RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.quantization.online.base import OnlineQuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    PPMissingLayer,
    WeightsMapper,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from model_impl import TableFreeConfig, TokenCode, TokenCoder
from model_impl.checkpoint import tensor_shapes


def make_norm(config: TableFreeConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.norm_bias)


def honoured_quantization(quant_config: QuantizationConfig | None) -> QuantizationConfig | None:
    """Checkpoints of this layout hold unquantized weights (load_weights takes exactly those), so
    only vLLM's online methods (fp8_per_tensor, ...: weights quantized while loading) can be
    honoured; a pre-quantized method (gptq, awq, a checkpoint's quantization_config) would expect
    tensors this layout does not have."""
    if quant_config is None or isinstance(quant_config, OnlineQuantizationConfig):
        return quant_config
    raise ValueError(
        f"quantization {quant_config.get_name()!r} needs a pre-quantized checkpoint, which the table-free "
        "layout does not have; serve the unquantized checkpoint, optionally with an online method "
        "(--quantization fp8_per_tensor, fp8_per_channel or fp8_per_block)"
    )


class TableFreeAttention(nn.Module):
    def __init__(
        self, config: TableFreeConfig, cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        total_heads = config.num_attention_heads
        tp_size = get_tensor_model_parallel_world_size()
        if total_heads % tp_size:
            raise ValueError(f"num_attention_heads {total_heads} is not divisible by tensor_parallel_size {tp_size}")
        self.num_heads = total_heads // tp_size
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, total_heads, bias=config.attention_bias, quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            config.hidden_size, config.hidden_size, bias=config.attention_out_bias, quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            is_neox_style=config.rope_style == "neox",  # else GPT-J interleaved pairs
            rope_parameters=config.rope_parameters,  # rope_theta, partial_rotary_factor
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, cache_config=cache_config, quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size] * 3, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class TableFreeMLP(nn.Module):
    def __init__(self, config: TableFreeConfig, quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.up_proj = ColumnParallelLinear(
            config.hidden_size, config.intermediate_size, bias=config.mlp_bias, quant_config=quant_config,
            prefix=f"{prefix}.up_proj",
        )
        self.act = get_act_fn(config.hidden_act)
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias, quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.up_proj(x)
        x, _ = self.down_proj(self.act(x))
        return x


class TableFreeBlock(nn.Module):
    def __init__(
        self, config: TableFreeConfig, cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = TableFreeAttention(config, cache_config, quant_config, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = make_norm(config)
        self.mlp = TableFreeMLP(config, quant_config, prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


@support_torch_compile
class TableFreeModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: TableFreeConfig = vllm_config.model_config.hf_config
        quant_config = honoured_quantization(vllm_config.quant_config)
        self.code_dtype = vllm_config.model_config.dtype
        self.input_kind = config.input_kind
        if config.input_kind == "codes":
            self.codes = TokenCoder(TokenCode.from_config(config))  # 32 integers, on every rank
        elif get_pp_group().is_first_rank:
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, quant_config=quant_config, prefix=f"{prefix}.embed_tokens"
            )
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: TableFreeBlock(config, vllm_config.cache_config, quant_config, prefix),
            prefix=f"{prefix}.layers",
        )
        if get_pp_group().is_last_rank:
            self.norm = make_norm(config)
        else:
            self.norm = PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.input_kind == "codes":
            return self.codes(input_ids, self.code_dtype)
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        else:
            x = intermediate_tensors["hidden_states"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            x = layer(positions, x)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": x})
        return self.norm(x)


class TableFreeForCausalLM(nn.Module, SupportsPP):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    # Checkpoint names (model_impl) -> this model's fused q/k/v projection.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v")}
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: TableFreeConfig = vllm_config.model_config.hf_config
        self.config = config
        self.model = TableFreeModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, bias=config.lm_head_bias,
                quant_config=vllm_config.quant_config,  # TableFreeModel has refused what cannot be honoured
                prefix=maybe_prefix(prefix, "lm_head"),
            )
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states, self.lm_head.bias)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads exactly the tensors model_impl writes; anything else is an error naming them."""
        expected = tensor_shapes(self.config)
        problems: list[str] = []
        seen: set[str] = set()

        def checked() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name not in expected:
                    problems.append(f"unexpected tensor {name} {tuple(tensor.shape)}")
                elif tuple(tensor.shape) != expected[name]:
                    problems.append(f"{name} has shape {tuple(tensor.shape)}, expected {expected[name]}")
                else:
                    seen.add(name)
                    if not is_pp_missing_parameter(self.hf_to_vllm_mapper.map_name(name), self):
                        yield name, tensor

        loaded = AutoWeightsLoader(self).load_weights(checked(), mapper=self.hf_to_vllm_mapper)
        problems += [f"missing tensor {name} {expected[name]}" for name in sorted(expected.keys() - seen)]
        if problems:
            raise ValueError("checkpoint does not match the table-free layout:\n  " + "\n  ".join(problems))
        return loaded
