"""Writes the foreign test checkpoints: remote code from tests/foreign, seeded random weights.

Weights are drawn independently of model_impl (matrices N(0, 0.1), norm weights around 1,
biases N(0, 0.1), input tables N(0, 1)), so a converter that drops, swaps or misreads a
tensor is caught.
"""

import importlib
from pathlib import Path

import torch

from model_impl.tokenizer import build_tokenizer

# name -> (config class, model class, tiny config) in tests/foreign/<name>.py
FIXTURES = {
    "gpt2_conv1d": ("AffineCodeGPTConfig", "AffineCodeGPTLMHeadModel", {}),
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


def write_foreign(name: str, out: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    config_name, model_name, tiny = FIXTURES[name]
    module = importlib.import_module(f"tests.foreign.{name}")
    config = getattr(module, config_name)(**{**tiny, **overrides})
    model_class = getattr(module, model_name)
    model = model_class(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.dim() == 1 and "norm" in pname or pname.split(".")[-2].startswith("ln"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator) if pname.endswith("weight")
                            else 0.1 * torch.randn(param.shape, generator=generator))
            elif param.shape[0] == config.vocab_size and "embed" in pname or pname.endswith("wte.weight"):
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    type(config).register_for_auto_class()
    model_class.register_for_auto_class("AutoModelForCausalLM")
    model.to(dtype).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out
