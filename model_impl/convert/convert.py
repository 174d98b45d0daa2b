"""`tablefree convert`: SRC (its own remote code) -> a checkpoint in this project's layout.

Nothing is written unless every step holds: the tensor family maps, the input map is
recovered, a candidate structure reproduces every block, and the converted model (through
model_impl) agrees with SRC on a probe prompt. DST is then written atomically.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import check_free, model_with_weights, tensor_shapes, write_atomically
from ..codes import bit_string, identity_affine
from ..configuration_tablefree import BinaryTableFreeConfig, TableFreeConfig
from .errors import ConvertError
from .families import LayerMap, map_layout, our_state_dict
from .localise import Place, compare_places, first_difference
from .probe import InputMap, first_block_inputs, recover_input
from .source import Source, config_value, load_remote_model, open_source
from .structure import Structure, describe, identify, probe_prompt, trace

HEAD_NAMES = ("num_attention_heads", "n_head", "num_heads", "n_heads")
CONTEXT_NAMES = ("max_position_embeddings", "n_positions", "n_ctx", "block_size", "max_seq_len", "seq_length",
                 "context_length", "max_sequence_length")
SPECIAL_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def config_int(config: dict, names: tuple[str, ...], given: int | None, what: str, flag: str) -> tuple[int, str]:
    """(value, where it came from): the flag wins, then config.json; neither is an error naming both."""
    if given is not None:
        return given, flag
    if found := config_value(config, names):
        return int(found[1]), f"config.json {found[0]}"
    raise ConvertError(f"the {what} is not in config.json (looked for {', '.join(names)}): pass {flag}")


@dataclass
class Conversion:
    source: Source
    layout: LayerMap
    heads_from: str
    input_map: InputMap
    structure: Structure
    config: TableFreeConfig
    state: dict[str, torch.Tensor]
    places: list[Place] = field(default_factory=list)
    dtype: torch.dtype | None = None  # what DST was written in

    def report(self) -> list[str]:
        layout, config, biases = self.layout, self.config, self.layout.biases()
        orientation = {True: ", Conv1D (transposed)", False: ""}[layout.conv1d]
        qkv = f"fused {layout.family.fused_qkv}" if layout.family.fused_qkv else "separate q/k/v"
        yes = {True: "yes", False: "no"}
        return [
            f"tensor family: {layout.family.name} ({qkv}{orientation}), {layout.num_layers} layers,"
            f" width {layout.width}, {config.num_attention_heads} heads ({self.heads_from})",
            f"input: {self.input_map.note}",
            f"structure: {describe(self.structure.fields)} (best of {self.structure.tried} candidates,"
            f" every block within {max(self.structure.block_errors):.1e})",
            f"biases: q/k/v {yes[biases['attention_bias']]}, attention output {yes[biases['attention_out_bias']]},"
            f" MLP {yes[biases['mlp_bias']]}, output head {yes[biases['lm_head_bias']]}",
            f"check: model_impl on the converted weights vs SRC, max relative difference"
            f" {max(p.relative for p in self.places):.1e} (input, {layout.num_layers} block outputs, logits)",
        ]


def plan(src: str, num_heads: int | None = None, context_length: int | None = None,
         progress: Callable[[str], None] = lambda _: None) -> Conversion:
    """Everything `convert` does short of writing: raises ConvertError naming the first problem.

    `progress` hears what each slow step starts doing.
    """
    source = open_source(src)
    layout = map_layout(source.tensors)  # names only: an unknown family fails before any code runs
    heads, heads_from = config_int(source.config, HEAD_NAMES, num_heads, "number of attention heads", "--num-heads")
    context, _ = config_int(source.config, CONTEXT_NAMES, context_length, "context length", "--context-length")
    progress(f"loading {source.path} with its own remote code ({layout.family.name} family, {layout.num_layers} layers)")
    model = load_remote_model(source)
    state = model.state_dict()
    if absent := [name for name in [*layout.names, *([layout.table] if layout.table else [])] if name not in state]:
        raise ConvertError(f"SRC's remote code holds no tensors named {', '.join(absent[:8])} (they are in its files)")
    vocab = state[f"{layout.family.head}.weight"].shape[0]
    blocks = [model.get_submodule(layout.block(i)) for i in range(layout.num_layers)]
    progress(f"probing what enters {layout.block(0)} for all {vocab:,} ids")
    input_map = recover_input(first_block_inputs(model, blocks[0], torch.arange(vocab), layout.width), state,
                              layout.table)

    up = state[next(k for k, v in layout.names.items() if v == "model.layers.0.mlp.up_proj.weight")]
    biases = layout.biases()
    base = dict(
        vocab_size=vocab, hidden_size=layout.width, num_hidden_layers=layout.num_layers, num_attention_heads=heads,
        intermediate_size=up.shape[1] if layout.conv1d else up.shape[0], max_position_embeddings=context,
        **{k: v for k, v in biases.items() if k != "norm_bias"},
        **{k: source.config.get(k) for k in SPECIAL_TOKENS}, **code_fields(input_map),
    )
    config_class = BinaryTableFreeConfig if is_plain_binary(input_map) else TableFreeConfig
    try:
        shapes = tensor_shapes(config_class(**base, norm_bias=biases["norm_bias"]))
    except ValueError as err:
        raise ConvertError(f"SRC's shape does not fit this project's model: {err}") from err
    ours = our_state_dict(layout, state, heads, shapes)
    progress("identifying the block structure: candidate configs against SRC's block outputs")
    structure = identify(base, ours, trace(model, blocks, probe_prompt(vocab), layout.width), source.config,
                         biases["norm_bias"])
    config = config_class(**base, **structure.fields)
    places = compare_places(model, layout, model_with_weights(config, ours), probe_prompt(vocab, seed=2))
    if bad := first_difference(places):
        raise ConvertError(f"the converted model differs from SRC first at {bad.name} ({bad.where}),"
                           f" relative {bad.relative:.1e}")
    return Conversion(source, layout, heads_from, input_map, structure, config, ours, places)


def code_fields(input_map: InputMap) -> dict:
    if input_map.code is None:
        return {"input_kind": "table"}
    code = input_map.code
    return {
        "input_kind": "codes", "code_matrix": [bit_string(row) for row in code.matrix],
        "code_shift": bit_string(code.shift), "code_expansion": code.expansion, "code_bit_order": code.bit_order,
        "code_values": code.values, "code_scale": code.scale,
    }


def is_plain_binary(input_map: InputMap) -> bool:
    code = input_map.code
    return code is not None and [list(r) for r in code.matrix] == identity_affine()[0] and not any(code.shift)


def tokenizer_files(path: Path) -> list[Path]:
    files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt") for f in files):
        raise ConvertError(f"{path} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return files


def convert(src: str, dst: str | Path, num_heads: int | None = None, context_length: int | None = None,
            dtype: str | None = None, force: bool = False, progress: Callable[[str], None] = lambda _: None
            ) -> Conversion:
    """Writes DST in this project's layout with SRC's tokenizer files; returns what was found."""
    dst = Path(dst)
    check_free(dst, force)
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    files = tokenizer_files(open_source(src).path)  # before the slow steps
    conversion = plan(src, num_heads, context_length, progress)
    target = DTYPES[dtype] if dtype else conversion.source.float_dtype
    progress(f"writing {dst}")
    model = model_with_weights(conversion.config, conversion.state).to(target)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        for file in files:
            shutil.copy2(file, staging / file.name)

    write_atomically(dst, write)
    conversion.dtype = target
    return conversion
