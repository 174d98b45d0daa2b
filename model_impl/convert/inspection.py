"""`tablefree inspect SRC`: what a checkpoint holds, from config.json and weight headers only.

No weight is loaded and no remote code runs. The verdict says whether this project serves
the checkpoint as is, or what `tablefree convert` will need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checkpoint import tensor_shapes
from ..configuration_tablefree import CODE_FIELDS, BinaryTableFreeConfig, MissingCodeLayoutError, TableFreeConfig
from .convert import CONTEXT_NAMES, HEAD_NAMES
from .errors import ConvertError
from .families import map_layout
from .source import Source, config_value, open_source
from .structure import EPS_NAMES, ROTARY_DIM_NAMES, ROTARY_FRACTION_NAMES, THETA_NAMES

SERVABLE, CONVERTIBLE, UNREADABLE = 0, 1, 2  # exit codes
OUR_TYPES = {c.model_type: c for c in (TableFreeConfig, BinaryTableFreeConfig)}


def _bits(value, length: int) -> bool:
    if isinstance(value, str):
        return len(value) == length and set(value) <= {"0", "1"}
    return isinstance(value, list) and len(value) == length and all(v in (0, 1) for v in value)


def code_layout_fields(config: dict) -> list[str]:
    """config.json fields that look like A (16 rows of 16 bits), b (16 bits) or a seed they come from."""
    found = []
    for key, value in config.items():
        if isinstance(value, list) and len(value) == 16 and all(_bits(row, 16) for row in value):
            found.append(f"{key} (16 x 16 bits)")
        elif _bits(value, 16):
            found.append(f"{key} (16 bits)")
        elif "seed" in key.lower() and isinstance(value, int):
            found.append(f"{key} (a seed)")
    return found


def served_as_is(source: Source) -> str | None:
    """None when this project serves SRC unchanged, else why not."""
    config_class = OUR_TYPES.get(source.config.get("model_type"))
    if config_class is None:
        return f"model_type {source.config.get('model_type')!r} is not this project's"
    try:
        config = config_class.from_dict(dict(source.config))
    except MissingCodeLayoutError as err:
        return f"config.json has this project's model_type but not its code fields ({', '.join(err.missing)})"
    except ValueError as err:
        return str(err)
    shapes = {name: tensor.shape for name, tensor in source.tensors.items()}
    expected = tensor_shapes(config)
    if shapes != expected:
        wrong = sorted(set(shapes.items()) ^ set(expected.items()))[:4]
        return f"its tensors differ from this project's layout ({', '.join(n for n, _ in wrong)} ...)"
    return None


@dataclass
class Inspection:
    lines: list[str] = field(default_factory=list)
    status: int = CONVERTIBLE


def inspect_checkpoint(src: str, num_heads: int | None = None) -> Inspection:
    out = Inspection()
    say = out.lines.append
    try:
        source = open_source(src, weights=False)
    except ConvertError as err:
        say(f"cannot read {src}: {err}")
        out.status = UNREADABLE
        return out
    config = source.config
    model_type = config.get("model_type")
    say(f"checkpoint: {source.path}")
    say(f"model_type: {model_type}{' (this project registers this type)' if model_type in OUR_TYPES else ''}")
    say(f"architectures: {', '.join(config.get('architectures') or ['-'])}")
    code = source.remote_code()
    say("remote code: " + (", ".join(f"{k} -> {v}" for k, v in code.items()) if code else "none (no auto_map)"))
    dtype = str(source.float_dtype).removeprefix("torch.")
    say(f"parameters: {source.parameters:,} ({dtype}, {len(source.tensors)} tensors)")

    why_not = served_as_is(source)
    if why_not is None:
        say("servable as is: yes (tablefree serve --model SRC, or vLLM with this project installed)")
        out.status = SERVABLE
        return out
    try:
        layout = map_layout(source.tensors)
    except ConvertError as err:
        say(f"tensor family: {err}")
        say(f"servable as is: no ({why_not}); convert cannot map it either")
        out.status = UNREADABLE
        return out
    qkv = f"fused {layout.family.fused_qkv}" if layout.family.fused_qkv else "separate q/k/v"
    orientation = ", Conv1D (transposed)" if layout.conv1d else ""
    say(f"tensor family: {layout.family.name} ({qkv}{orientation}), {layout.num_layers} layers, width {layout.width}")
    needs = []
    heads = f"{num_heads} (--num-heads)" if num_heads else None
    if heads is None and (found := config_value(config, HEAD_NAMES)):
        heads = f"{found[1]} (config.json {found[0]})"
    if heads is None:
        needs.append("--num-heads N (no head count in config.json)")
    say(f"heads: {heads or 'not in config.json'}")
    context = config_value(config, CONTEXT_NAMES)
    say(f"context length: {f'{context[1]} (config.json {context[0]})' if context else 'not in config.json'}")
    if context is None:
        needs.append("--context-length N")

    if layout.table:
        say(f"input: a {' x '.join(map(str, source.tensors[layout.table].shape))} tensor {layout.table}: a learned"
            " table, unless probing finds that its rows are an affine code")
    else:
        places = []
        if fields := code_layout_fields(config):
            places.append("config.json fields " + ", ".join(fields))
        if layout.code_tensors:
            places.append("state-dict tensors " + ", ".join(
                f"{n} {tuple(source.tensors[n].shape)}" for n in layout.code_tensors))
        say("input: no input table; code layout in " + ("; ".join(places) if places else
            "the remote code only (neither config.json nor the weights hold it)"))
    ours = [name for name in CODE_FIELDS if name in config]
    say(f"this project's code fields: {', '.join(ours) if ours else 'none'}")
    biases = layout.biases()
    norm = "LayerNorm with bias" if biases["norm_bias"] else "LayerNorm without bias or RMSNorm"
    known = [f"{what} {found[1]} ({found[0]})" for what, names in (
        ("epsilon", EPS_NAMES), ("rotary base", THETA_NAMES), ("rotary dim", ROTARY_DIM_NAMES),
        ("rotary fraction", ROTARY_FRACTION_NAMES)) if (found := config_value(config, names))]
    say(f"structure to identify numerically: norm ({norm}), GELU exact or tanh, rotary NeoX or GPT-J, rotary"
        f" dimension and base{'; config.json names ' + ', '.join(known) if known else ''}")
    say(f"servable as is: no ({why_not})")
    run = f"tablefree convert {src} DST" + "".join(f" {n.split(' (')[0]}" for n in needs)
    say(f"convert will run SRC's remote code (trust_remote_code), probe all 65,536 input ids and compare candidate"
        f" blocks; run: {run}")
    return out
