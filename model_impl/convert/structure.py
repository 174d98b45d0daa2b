"""Identifies a block's structural choices by comparing candidate configs with SRC's outputs.

SRC runs once on a probe prompt with hooks on its blocks. Each candidate (norm, epsilon,
GELU variant, rotary style, dimension and base) builds this project's block 0 with SRC's
mapped weights, runs it on SRC's block-0 input and is scored against SRC's block-0 output;
the best one must agree to float noise and is then checked on every block. Values found in
config.json under a usual name narrow the search; if they do not fit, the full grid is tried.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..configuration_tablefree import TableFreeConfig
from ..modeling_tablefree import TableFreeBlock, make_norm, rotary_cos_sin
from .errors import ConvertError
from .probe import hidden_argument
from .source import config_value

# Relative max difference (to the largest output value) that is float32 noise, not a difference.
MATCH = 1e-4
PROBE_LENGTH = 48

EPS_NAMES = ("layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps", "norm_eps", "norm_epsilon", "eps")
THETA_NAMES = ("rope_theta", "rotary_base", "rotary_emb_base", "rope_base", "rotary_theta", "base")
ROTARY_DIM_NAMES = ("rotary_dim", "rope_dim", "rotary_ndims", "rotary_emb_dim")
ROTARY_FRACTION_NAMES = ("partial_rotary_factor", "rotary_pct", "rotary_fraction")
GRID = {
    "layer_norm_eps": [1e-5, 1e-6],
    "hidden_act": ["gelu", "gelu_pytorch_tanh"],
    "rope_style": ["neox", "gptj"],
    "partial_rotary_factor": [1.0, 0.5, 0.25],
    "rope_theta": [10000.0, 100000.0, 500000.0, 1000000.0],
}


@dataclass
class Trace:
    """SRC's hidden states on one prompt: what enters and leaves each block, and the logits."""

    ids: torch.Tensor  # (1, seq)
    block_inputs: list[torch.Tensor]
    block_outputs: list[torch.Tensor]
    logits: torch.Tensor


def first_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "logits"):
        return value.logits
    return next(v for v in (value.values() if isinstance(value, Mapping) else value) if isinstance(v, torch.Tensor))


@torch.no_grad()
def trace(model: nn.Module, blocks: list[nn.Module], ids: torch.Tensor, width: int) -> Trace:
    inputs: list[torch.Tensor | None] = [None] * len(blocks)
    outputs: list[torch.Tensor | None] = [None] * len(blocks)

    def hook(i):
        def record(_module, args, kwargs, output):
            inputs[i] = hidden_argument((*args, *kwargs.values()), width).float()
            outputs[i] = first_tensor(output).float()
        return record

    handles = [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        logits = first_tensor(model(ids)).float()
    finally:
        for handle in handles:
            handle.remove()
    return Trace(ids, inputs, outputs, logits)


def probe_prompt(vocab: int, length: int = PROBE_LENGTH, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def relative_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)).item()


def _module(cls, config: TableFreeConfig, weights: Mapping[str, torch.Tensor], *args) -> nn.Module:
    with torch.device("meta"):
        module = cls(config, *args)
    module.load_state_dict(weights, assign=True, strict=True)
    return module.eval()


def block_weights(state: Mapping[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{i}."
    return {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}


@torch.no_grad()
def block_error(config: TableFreeConfig, state: Mapping[str, torch.Tensor], src: Trace, i: int) -> float:
    block = _module(TableFreeBlock, config, block_weights(state, i), i)
    positions = torch.arange(src.ids.shape[1]).unsqueeze(0)
    cos, sin = rotary_cos_sin(positions, config, torch.float32)
    return relative_diff(block(src.block_inputs[i], cos, sin, None, None), src.block_outputs[i])


@torch.no_grad()
def head_error(config: TableFreeConfig, state: Mapping[str, torch.Tensor], src: Trace) -> float:
    norm = _module(make_norm, config, {k[len("model.norm."):]: v.float() for k, v in state.items()
                                       if k.startswith("model.norm.")})
    weight, bias = state["lm_head.weight"].float(), state.get("lm_head.bias")
    logits = nn.functional.linear(norm(src.block_outputs[-1]), weight, None if bias is None else bias.float())
    return relative_diff(logits, src.logits)


def _from_config(config: dict, head_dim: int) -> dict[str, list]:
    """Candidate values that config.json names under a usual key."""
    found: dict[str, list] = {}
    if eps := config_value(config, EPS_NAMES):
        found["layer_norm_eps"] = [float(eps[1])]
    if theta := config_value(config, THETA_NAMES):
        found["rope_theta"] = [float(theta[1])]
    if dim := config_value(config, ROTARY_DIM_NAMES):
        found["partial_rotary_factor"] = [int(dim[1]) / head_dim]
    elif fraction := config_value(config, ROTARY_FRACTION_NAMES):
        found["partial_rotary_factor"] = [float(fraction[1])]
    return found


def _candidates(grid: dict[str, list], norms: list[tuple[str, bool]]) -> list[dict]:
    keys = list(grid)
    out = []
    for (norm_type, norm_bias), values in itertools.product(norms, itertools.product(*grid.values())):
        fields = dict(zip(keys, values))
        rope = {"rope_type": "default", "rope_theta": fields.pop("rope_theta"),
                "partial_rotary_factor": fields.pop("partial_rotary_factor")}
        out.append({**fields, "norm_type": norm_type, "norm_bias": norm_bias, "rope_parameters": rope})
    return out


def describe(fields: dict) -> str:
    rope = fields["rope_parameters"]
    norm = "RMSNorm" if fields["norm_type"] == "rmsnorm" else f"LayerNorm {'with' if fields['norm_bias'] else 'without'} bias"
    act = "exact" if fields["hidden_act"] == "gelu" else "tanh"
    part = "the whole head" if rope["partial_rotary_factor"] == 1 else f"{rope['partial_rotary_factor']:g} of each head"
    return (f"{norm} (eps {fields['layer_norm_eps']:g}), GELU {act}, rotary {fields['rope_style']} on {part},"
            f" base {rope['rope_theta']:g}")


@dataclass
class Structure:
    fields: dict  # TableFreeConfig fields
    block_errors: list[float]
    head_error: float
    tried: int


def identify(base: dict, state: Mapping[str, torch.Tensor], src: Trace, src_config: dict, norm_bias: bool) -> Structure:
    """The config fields under which this project's blocks reproduce SRC's, checked on every block."""
    head_dim = base["hidden_size"] // base["num_attention_heads"]
    norms = [("layernorm", True)] if norm_bias else [("layernorm", False), ("rmsnorm", False)]
    narrow = {**GRID, **_from_config(src_config, head_dim)}
    tried = 0
    best: tuple[float, dict] | None = None
    for grid in (narrow, {k: sorted(set(GRID[k] + narrow[k])) for k in GRID}):
        for fields in _candidates(grid, norms):
            try:
                config = TableFreeConfig(**base, **fields)
            except ValueError:  # e.g. a rotary fraction giving an odd dimension
                continue
            tried += 1
            error = block_error(config, state, src, 0)
            if best is None or error < best[0]:
                best = (error, fields)
        if best[0] < MATCH or grid == narrow and narrow == GRID:
            break
    error, fields = best
    if error >= MATCH:
        raise ConvertError(
            f"no candidate configuration reproduces SRC's block 0 (best: {describe(fields)}, relative difference"
            f" {error:.1e} after {tried} candidates): its block has a structure this project does not implement"
            " (e.g. parallel residual, post-norm, a gated MLP)"
        )
    config = TableFreeConfig(**base, **fields)
    errors = [block_error(config, state, src, i) for i in range(base["num_hidden_layers"])]
    if (bad := next((i for i, e in enumerate(errors) if e >= MATCH), None)) is not None:
        raise ConvertError(f"block 0 matches as {describe(fields)}, but block {bad} differs (relative {errors[bad]:.1e})")
    final = head_error(config, state, src)
    if final >= MATCH:
        raise ConvertError(f"every block matches, but the final norm + output head differ (relative {final:.1e})")
    return Structure(fields, errors, final, tried)
