"""A source checkpoint: its directory, config.json, safetensors headers and remote code.

Headers are read without loading any weight. A hub id is fetched with huggingface_hub
(config, code and tokenizer files for `inspect`, everything for `convert`/`verify`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ConvertError

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
FLOATS = (*DTYPES, "F64")
# Files inspect needs from a hub repository (no weights).
LIGHT_FILES = ["*.json", "*.py", "*.txt", "*.model"]


@dataclass(frozen=True)
class Tensor:
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "F32", "BF16", "I64", ...


@dataclass
class Source:
    path: Path
    config: dict  # config.json as written
    tensors: dict[str, Tensor]  # from the safetensors headers

    @property
    def parameters(self) -> int:
        """Floating-point values held (masks and integer buffers are no parameters)."""
        return sum(_numel(t.shape) for t in self.tensors.values() if t.dtype in FLOATS)

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (the most common float dtype)."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in DTYPES:
                counts[t.dtype] = counts.get(t.dtype, 0) + _numel(t.shape)
        return DTYPES[max(counts, key=counts.get)] if counts else torch.float32

    def remote_code(self) -> dict[str, str]:
        """auto_map entries of config.json: Auto class -> "module.Class"."""
        return {k: v for k, v in self.config.get("auto_map", {}).items() if isinstance(v, str)}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def resolve(src: str, weights: bool) -> Path:
    """A directory for SRC: itself, or a hub id fetched into the Hugging Face cache."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists() or src.count("/") != 1:
        raise ConvertError(f"{src} is not a checkpoint directory (nor a hub id like owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, allow_patterns=None if weights else LIGHT_FILES))
    except Exception as err:  # offline, unknown repo, no access: all mean "cannot read SRC"
        raise ConvertError(f"{src} is not a local directory and could not be fetched from the hub: {err}") from err


def read_headers(path: Path) -> dict[str, Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{path} holds no *.safetensors weights (pickled .bin checkpoints are not read)")
    tensors = {}
    for file in files:
        with safe_open(file, "pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                tensors[name] = Tensor(tuple(piece.get_shape()), piece.get_dtype())
    return tensors


def hub_headers(repo: str) -> dict[str, Tensor]:
    from huggingface_hub import HfApi

    try:
        meta = HfApi().get_safetensors_metadata(repo)
    except Exception as err:
        raise ConvertError(f"could not read the safetensors headers of {repo} from the hub: {err}") from err
    return {
        name: Tensor(tuple(info.shape), info.dtype)
        for file in meta.files_metadata.values()
        for name, info in file.tensors.items()
    }


def open_source(src: str, weights: bool = True) -> Source:
    """Reads config.json and the weight headers; `weights=False` fetches no weights from a hub."""
    path = resolve(src, weights)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConvertError(f"{path} has no config.json")
    config = json.loads(config_file.read_text())
    local = any(path.glob("*.safetensors"))
    tensors = read_headers(path) if local or weights else hub_headers(src)
    return Source(path, config, tensors)


def config_value(config: dict, names: tuple[str, ...]) -> tuple[str, object] | None:
    """The first of `names` found in config.json (top level, then nested dicts such as rope_parameters)."""
    for name in names:
        if name in config and config[name] is not None:
            return name, config[name]
    for key, value in config.items():
        if isinstance(value, dict) and (found := config_value(value, names)):
            return f"{key}.{found[0]}", found[1]
    return None


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def load_remote_model(source: Source) -> torch.nn.Module:
    """SRC's model through its own remote code (trust_remote_code), float32 on the CPU, in eval mode.

    The classes come from auto_map directly: the Auto classes would pick this project's config
    class for the published checkpoint's model_type, which is also this project's. The model is
    built by its own __init__ and then given the files' tensors, not through from_pretrained:
    Transformers 5 leaves buffers that the code computes in __init__ (A and b, rotary
    frequencies) uninitialised there, which remote code written for Transformers 4 relies on.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    code = source.remote_code()
    missing = [auto for auto in ("AutoConfig", "AutoModelForCausalLM") if auto not in code]
    if missing:
        raise ConvertError(
            f"{source.path}: config.json has no auto_map entry for {', '.join(missing)}, so there is no remote code"
            " to load it with; convert runs the checkpoint's own code to recover its layout"
        )
    try:
        config_class = get_class_from_dynamic_module(code["AutoConfig"], str(source.path))
        model_class = get_class_from_dynamic_module(code["AutoModelForCausalLM"], str(source.path))
        model = model_class(config_class.from_pretrained(source.path)).float()
    except Exception as err:
        raise ConvertError(f"{source.path}: its remote code failed to build the model: {type(err).__name__}: {err}") from err
    result = model.load_state_dict(load_state(source.path), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConvertError(
            f"{source.path}: its files and its remote code disagree: missing {result.missing_keys[:8]},"
            f" unexpected {result.unexpected_keys[:8]}"
        )
    return model.eval()
