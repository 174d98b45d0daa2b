"""Writes the foreign test checkpoints: remote code from tests/foreign, seeded random weights.

Weights are drawn independently of model_impl (matrices and biases N(0, 0.8^2 / width),
norm weights around 1, input tables N(0, 1)), so a converter that drops, swaps or
misreads a tensor is caught.
"""

import importlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from model_impl.tokenizer import build_tokenizer

# name -> (config class, model class, tiny config) in tests/foreign/<name>.py
FIXTURES = {
    "gpt2_conv1d": ("AffineCodeGPTConfig", "AffineCodeGPTLMHeadModel", {}),
    "nanogpt_linear": ("NanoCodesConfig", "NanoCodesGPT", {}),
    "llama_seeded": ("SeededCodeConfig", "SeededCodeForCausalLM", {}),
    "neox_table": ("TableBaselineConfig", "TableBaselineForCausalLM", {}),
}


def random_affine(seed: int) -> tuple[list[list[int]], list[int]]:
    """An invertible 16 x 16 matrix over GF(2) and a shift, drawn with torch (not model_impl's recipe)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        matrix = torch.randint(0, 2, (16, 16), generator=generator)
        if torch.linalg.matrix_rank(matrix.double()) == 16 and gf2_invertible(matrix.tolist()):
            return matrix.tolist(), torch.randint(0, 2, (16,), generator=generator).tolist()


def gf2_invertible(rows: list[list[int]]) -> bool:
    rows = [int("".join(map(str, r)), 2) for r in rows]
    for bit in reversed(range(16)):
        pivot = next((r for r in rows if r >> bit & 1), None)
        if pivot is None:
            return False
        rows.remove(pivot)
        rows = [r ^ pivot if r >> bit & 1 else r for r in rows]
    return True


def write_foreign(name: str, out: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                  buffers: dict | None = None, **overrides) -> Path:
    """A checkpoint of fixture `name` in `out`; `buffers` sets persistent buffers (e.g. A, b) by name."""
    config_name, model_name, tiny = FIXTURES[name]
    module = importlib.import_module(f"tests.foreign.{name}")
    config = getattr(module, config_name)(**{**tiny, **overrides})
    model_class = getattr(module, model_name)
    model = model_class(config)
    generator = torch.Generator().manual_seed(seed)
    std = 0.8 / config.hidden_size**0.5

    def normal(shape, scale):
        return scale * torch.randn(shape, generator=generator)

    with torch.no_grad():
        for module in model.modules():
            for pname, param in module.named_parameters(recurse=False):
                if isinstance(module, torch.nn.Embedding):
                    param.copy_(normal(param.shape, 1.0))
                elif "Norm" in type(module).__name__ and pname == "weight":
                    param.copy_(1 + normal(param.shape, 0.1))
                else:
                    param.copy_(normal(param.shape, std))
        if buffers:
            for name, value in buffers.items():
                model.get_buffer(name).copy_(torch.tensor(value))
    type(config).register_for_auto_class()
    model_class.register_for_auto_class("AutoModelForCausalLM")
    model.to(dtype).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def load_foreign(name: str, path: Path) -> torch.nn.Module:
    """A fixture checkpoint through its own classes, as its authors run it (built, then given its tensors)."""
    config_name, model_name, _ = FIXTURES[name]
    module = importlib.import_module(f"tests.foreign.{name}")
    model = getattr(module, model_name)(getattr(module, config_name).from_pretrained(path))
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    model.load_state_dict(state)
    return model.float().eval()
