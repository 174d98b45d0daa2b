"""Writes random-weight checkpoints in the layout model_impl, vLLM and the server load.

A checkpoint is config.json (with auto_map), generation_config.json, safetensors
weights, the model code (for trust_remote_code) and the tokenizer. Every tensor gets
random values, norms and biases included, so a loader that drops or swaps one is
caught by parity tests.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .codes import TokenCoder
from .configuration_tablefree import BinaryTableFreeConfig, TableFreeConfig
from .modeling_tablefree import BinaryTableFreeForCausalLM, TableFreeForCausalLM
from .tokenizer import build_tokenizer

# "card": the published shape (the config defaults). "tiny": same vocab, 16-bit codes and
# head_dim 32 (vLLM's CPU attention needs >= 32), small enough for fast tests.
PRESETS: dict[str, dict] = {
    "card": {},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256},
}
VARIANTS = {
    "affine": (TableFreeConfig, TableFreeForCausalLM),
    "binary": (BinaryTableFreeConfig, BinaryTableFreeForCausalLM),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CheckpointSummary:
    path: Path
    parameters: int
    input_embedding_parameters: int


def make_config(preset: str, variant: str = "affine", **overrides) -> TableFreeConfig:
    """The config of a preset; raises ValueError for an unknown preset/variant or a bad shape."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    fields = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return VARIANTS[variant][0](**fields)


def model_class(config: TableFreeConfig) -> type[TableFreeForCausalLM]:
    return VARIANTS["binary" if isinstance(config, BinaryTableFreeConfig) else "affine"][1]


def tensor_shapes(config: TableFreeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `config` holds, with its shape, read off the model itself."""
    with torch.device("meta"):
        model = model_class(config)(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def empty_model(config: TableFreeConfig) -> TableFreeForCausalLM:
    """A model with uninitialised weights (to be filled) and its code buffers set from the config."""
    with torch.device("meta"):
        model = model_class(config)(config)
    model.to_empty(device="cpu")
    if isinstance(coder := model.get_input_embeddings(), TokenCoder):
        model._init_weights(coder)  # its buffers are derived from the config
    return model


def model_with_weights(config: TableFreeConfig, state: dict[str, torch.Tensor]) -> TableFreeForCausalLM:
    """A model holding exactly `state`'s tensors (no copy; strict about names and shapes)."""
    with torch.device("meta"):
        model = model_class(config)(config)
    model.load_state_dict(state, assign=True, strict=True)
    if isinstance(coder := model.get_input_embeddings(), TokenCoder):
        coder.to_empty(device="cpu")
        model._init_weights(coder)
    return model.eval()


def random_model(config: TableFreeConfig, seed: int, progress: bool = False) -> TableFreeForCausalLM:
    """A model with seeded random weights, built block by block (a progress bar for big shapes)."""
    model = empty_model(config)
    inputs = model.get_input_embeddings()
    generator = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    blocks = [inputs, *model.model.layers, model.model.norm, model.lm_head]
    norm = type(model.model.norm)  # LayerNorm or RMSNorm: weights around 1
    for block in tqdm(blocks, desc="random weights", unit="block", disable=not progress):
        for module in block.modules():
            for name, param in module.named_parameters(recurse=False):
                with torch.no_grad():
                    param.normal_(0.0, std, generator=generator)
                    if isinstance(module, norm) and name == "weight":
                        param.add_(1.0)
    return model.eval()


def input_embedding_parameters(model: TableFreeForCausalLM) -> int:
    return sum(p.numel() for p in model.get_input_embeddings().parameters())


def make_checkpoint(
    out: str | os.PathLike,
    config: TableFreeConfig,
    seed: int = 0,
    dtype: str = "float32",
    force: bool = False,
    max_shard_size: str | None = None,
    progress: bool = False,
) -> CheckpointSummary:
    """Write a checkpoint to `out`, atomically: a failure leaves `out` as it was."""
    out = Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    check_free(out, force)
    model = random_model(config, seed, progress).to(DTYPES[dtype])

    def write(staging: Path) -> None:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(staging, **kwargs)
        build_tokenizer().save_pretrained(staging)

    write_atomically(out, write)
    return CheckpointSummary(out, sum(p.numel() for p in model.parameters()), input_embedding_parameters(model))


def check_free(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")


def write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a staging folder next to `out`, which then replaces `out`: a failure leaves `out` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(staging)
        apply_umask(staging)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def apply_umask(root: Path) -> None:
    """Give `root` and everything under it the modes a plain mkdir/open would (0777/0666 less the umask).

    mkdtemp makes 0700 and the weights arrive as 0600 whatever the umask, so a checkpoint made by
    one user (root, say) and mounted into a container running as another could not be read.
    """
    umask = os.umask(0)
    os.umask(umask)  # the only portable way to read it
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~umask)


def check_readable(path: str | os.PathLike) -> None:
    """Raise PermissionError naming each part of a local checkpoint this process cannot read.

    vLLM reports an unreadable checkpoint directory as "Invalid repository ID or local directory",
    which hides why. A path that does not exist is left to the loader (it may be a hub repository id).
    """
    path = Path(path)
    try:
        path.stat()
    except FileNotFoundError:
        return
    except PermissionError:
        entries = [next((p for p in reversed(path.parents) if not os.access(p, os.X_OK)), path.parent)]
    else:
        entries = [path]
        for dirpath, dirnames, filenames in os.walk(path):  # nothing below a directory it cannot list
            entries += [Path(dirpath, name) for name in dirnames + filenames]
    blocked = [p for p in entries if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0))]
    if blocked:
        raise PermissionError(
            f"checkpoint {path} is not readable by uid {os.geteuid()}: {', '.join(map(_describe, blocked))}; "
            f"make it readable (e.g. chmod -R a+rX {path})"
        )


def _describe(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return str(path)
    return f"{path} ({stat.filemode(st.st_mode)}, owner uid {st.st_uid})"


def default_checkpoint() -> Path:
    """The embedded default model: a card-shaped random-weight checkpoint, built on first use.

    Kept in $TABLEFREE_CACHE (default ~/.cache/tablefree). Its weights are random: it
    exercises the serving stack, it does not produce meaningful text. Written in bfloat16, the
    dtype vLLM's dtype="auto" serves it in (on CPUs and bf16 GPUs), so loading casts nothing.
    """
    cache = Path(os.environ.get("TABLEFREE_CACHE", Path.home() / ".cache" / "tablefree"))
    path = cache / "demo-card-seed0-bfloat16"
    if not (path / "config.json").exists():
        print(f"building the card-shaped demo checkpoint (random weights) in {path}")
        make_checkpoint(path, make_config("card"), seed=0, dtype="bfloat16", force=True, progress=True)
    return path
