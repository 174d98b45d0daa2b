"""Tensor-name families of decoder checkpoints, mapped to this project's names.

A family says where a block's norms and projections live and how q/k/v are stored. The
mapping is by name and shape only; whether the weights really mean what the names say is
checked numerically afterwards (`structure`, `localise`). GPT-2 `Conv1D` layers store
their weights transposed, (in, out); that is read off the fused q/k/v shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .errors import ConvertError
from .source import Tensor

# This project's names inside block N (model.layers.N.<name>).
NORMS = ("input_layernorm", "post_attention_layernorm")
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LINEARS = (*QKV, "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
# Up to 16 x 16 + 16 values: room for A and b stored as tensors (recovered by probing, not read).
CODE_TENSOR_MAX = 16 * 16 + 16


@dataclass(frozen=True)
class Family:
    name: str
    layers: str  # block N's module, with {} for N
    block: dict[str, str]  # this project's module in a block -> the family's
    final_norm: str
    head: str
    table: str  # where the family keeps an input table, when it has one
    fused_qkv: str | None = None  # the family's fused q/k/v module, if any
    per_head_qkv: bool = False  # fused rows ordered [q_h, k_h, v_h] per head (GPT-NeoX), else [q; k; v]
    derived: tuple[str, ...] = ()  # buffers that are no weights (e.g. GPT-2's causal mask "attn.bias")


FAMILIES = (
    Family(
        "gpt2",  # GPT-2 / nanoGPT: fused c_attn as nn.Linear or Conv1D
        layers="transformer.h.{}",
        block={"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.c_proj",
               "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"},
        fused_qkv="attn.c_attn",
        final_norm="transformer.ln_f",
        head="lm_head",
        table="transformer.wte",
        derived=("attn.bias", "attn.masked_bias"),
    ),
    Family(
        "llama",  # Llama-style separate q/k/v; this project's own names
        layers="model.layers.{}",
        block={name: name for name in (*NORMS, *LINEARS)},
        final_norm="model.norm",
        head="lm_head",
        table="model.embed_tokens",
    ),
    Family(
        "gpt-neox",  # GPT-NeoX names, fused query_key_value interleaved per head
        layers="gpt_neox.layers.{}",
        block={"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
               "self_attn.o_proj": "attention.dense", "mlp.up_proj": "mlp.dense_h_to_4h",
               "mlp.down_proj": "mlp.dense_4h_to_h"},
        fused_qkv="attention.query_key_value",
        per_head_qkv=True,
        final_norm="gpt_neox.final_layer_norm",
        head="embed_out",
        table="gpt_neox.embed_in",
    ),
)


@dataclass
class LayerMap:
    """How SRC's tensors map onto this project's, and what is left over (and why that is fine)."""

    family: Family
    num_layers: int
    width: int
    conv1d: bool  # 2-D block weights stored (in, out)
    table: str | None  # SRC's input-table tensor, if it has one
    code_tensors: list[str] = field(default_factory=list)  # small tensors, e.g. A and b as buffers
    derived: list[str] = field(default_factory=list)  # buffers that are no weights
    names: dict[str, str] = field(default_factory=dict)  # SRC tensor -> this project's, for every mapped one

    def block(self, i: int) -> str:
        return self.family.layers.format(i)

    def has(self, ours: str) -> bool:
        return ours in self.names.values()

    def biases(self) -> dict[str, bool]:
        """This project's bias flags: a flag is set when any of its tensors exists in SRC."""
        def any_bias(modules: tuple[str, ...]) -> bool:
            return any(self.has(f"model.layers.{i}.{m}.bias") for i in range(self.num_layers) for m in modules)

        return {
            "attention_bias": any_bias((*QKV, "self_attn.qkv")),
            "attention_out_bias": any_bias(("self_attn.o_proj",)),
            "mlp_bias": any_bias(("mlp.up_proj", "mlp.down_proj")),
            "lm_head_bias": self.has("lm_head.bias"),
            "norm_bias": any_bias(NORMS) or self.has("model.norm.bias"),
        }


def _layer_indices(family: Family, names) -> set[int]:
    pattern = re.compile(re.escape(family.layers).replace(r"\{\}", r"(\d+)") + r"\.")
    return {int(m.group(1)) for name in names if (m := pattern.match(name))}


def known_families() -> str:
    return ", ".join(f"{f.name} ({f.layers.format('N')}.*)" for f in FAMILIES)


def map_layout(tensors: Mapping[str, Tensor]) -> LayerMap:
    """Finds SRC's family from tensor names and shapes; every tensor must be accounted for."""
    scores = {f.name: len(_layer_indices(f, tensors)) for f in FAMILIES}
    family = next((f for f in FAMILIES if scores[f.name] == max(scores.values()) and scores[f.name]), None)
    if family is None:
        sample = ", ".join(sorted(tensors)[:8])
        raise ConvertError(f"unknown tensor family: no known layout matches ({sample}, ...); known: {known_families()}")
    num_layers = max(_layer_indices(family, tensors)) + 1
    norm = f"{family.layers.format(0)}.{family.block['input_layernorm']}.weight"
    if norm not in tensors:
        raise ConvertError(f"{family.name} family: {norm} is missing, so the model width is unknown")
    width = tensors[norm].shape[0]
    conv1d = False
    if family.fused_qkv:
        shape = tensors.get(f"{family.layers.format(0)}.{family.fused_qkv}.weight", Tensor((), "")).shape
        if shape not in ((3 * width, width), (width, 3 * width)):
            raise ConvertError(f"{family.name} family: fused {family.fused_qkv}.weight has shape {shape}, expected"
                               f" {(3 * width, width)} (nn.Linear) or {(width, 3 * width)} (Conv1D)")
        conv1d = shape == (width, 3 * width)

    names: dict[str, str] = {}
    missing: list[str] = []

    def take(theirs: str, ours: str, required: bool) -> None:
        for kind in ("weight", "bias"):
            if f"{theirs}.{kind}" in tensors:
                names[f"{theirs}.{kind}"] = f"{ours}.{kind}"
            elif kind == "weight" and required:
                missing.append(f"{theirs}.weight")

    for i in range(num_layers):
        prefix = family.layers.format(i)
        for ours, theirs in family.block.items():
            take(f"{prefix}.{theirs}", f"model.layers.{i}.{ours}", True)
        if family.fused_qkv:
            take(f"{prefix}.{family.fused_qkv}", f"model.layers.{i}.self_attn.qkv", True)
    take(family.final_norm, "model.norm", True)
    take(family.head, "lm_head", True)
    if missing:
        raise ConvertError(f"{family.name} family, but these tensors are missing: {', '.join(missing[:8])}")

    layout = LayerMap(family, num_layers, width, conv1d, None)
    unknown = []
    for name, tensor in tensors.items():
        if name in names:
            continue
        numel = torch.Size(tensor.shape).numel()
        if name.endswith("inv_freq") or any(name.endswith(f".{d}") for d in family.derived):
            layout.derived.append(name)
        elif name == f"{family.table}.weight" or (len(tensor.shape) == 2 and tensor.shape[1] == width
                                                  and tensor.shape[0] == tensors[f"{family.head}.weight"].shape[0]):
            if layout.table:
                unknown.append(name)
            layout.table = name
        elif numel <= CODE_TENSOR_MAX:
            layout.code_tensors.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise ConvertError(f"{family.name} family, but these tensors are unknown to it: {', '.join(unknown[:8])}"
                           f"{' ...' if len(unknown) > 8 else ''}")
    layout.names = names
    return layout


def _split_qkv(tensor: torch.Tensor, heads: int, per_head: bool) -> tuple[torch.Tensor, ...]:
    """Fused q/k/v rows (weight (3W, W) or bias (3W,)) -> q, k, v."""
    if not per_head:
        return tensor.chunk(3, dim=0)
    grouped = tensor.reshape(heads, 3, -1, *tensor.shape[1:])
    return tuple(grouped[:, j].reshape(-1, *tensor.shape[1:]) for j in range(3))


def our_state_dict(layout: LayerMap, state: Mapping[str, torch.Tensor], heads: int,
                   expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """SRC's tensors under this project's names; `expected` (checkpoint.tensor_shapes) decides which.

    A bias the config has but SRC lacks for one module (e.g. q has a bias, k has none) is zero:
    a zero bias is no bias.
    """
    ours: dict[str, torch.Tensor] = {}
    for theirs, name in layout.names.items():
        tensor = state[theirs]
        if layout.conv1d and tensor.dim() == 2 and name.startswith("model.layers."):
            tensor = tensor.t()
        if ".self_attn.qkv." in name:
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(tensor, heads, layout.family.per_head_qkv)):
                ours[name.replace("qkv", proj)] = part
        else:
            ours[name] = tensor
    if layout.table and "model.embed_tokens.weight" in expected:
        ours["model.embed_tokens.weight"] = state[layout.table]
    for name, shape in expected.items():
        if name not in ours and name.endswith(".bias"):
            ours[name] = torch.zeros(shape, dtype=next(iter(ours.values())).dtype)
    problems = [f"{name}: got {tuple(t.shape)}, expected {expected.get(name)}" for name, t in ours.items()
                if tuple(t.shape) != expected.get(name)]
    problems += [f"{name}: missing" for name in expected.keys() - ours.keys()]
    if problems:
        raise ConvertError("mapped tensors do not fit this project's layout:\n  " + "\n  ".join(problems[:12]))
    return {name: t.contiguous() for name, t in ours.items()}
