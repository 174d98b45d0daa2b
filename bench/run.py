"""Bench plumbing: checkpoints of both compared shapes, and workers run as child processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from model_impl.checkpoint import default_checkpoint, make_checkpoint, make_config
from model_impl.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TABLEFREE_CACHE", Path.home() / ".cache" / "tablefree")) / "bench"
PRESET = {"smoke": "tiny", "full": "card"}


def table_free_checkpoint(size: str) -> Path:
    """Ours: full is the server's card-shaped demo checkpoint (bf16 on disk); smoke a cached tiny one (fp32)."""
    if size == "full":
        return default_checkpoint()
    path = CACHE / f"tablefree-{PRESET[size]}"
    if not (path / "config.json").exists():
        make_checkpoint(path, make_config(PRESET[size]), seed=0, force=True, progress=True)
    return path


def in_tree_checkpoint(kind: str, size: str) -> Path:
    """A vLLM in-tree architecture with our shape (width, depth, heads, vocab, 4x GELU MLP), random weights.

    "gpt2": LayerNorm, biases, learned positions. "gptj": LayerNorm, rotary over the whole head,
    lm_head bias, one norm per block (parallel attention and MLP). Both have an input table.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM

    path = CACHE / f"{kind}-{PRESET[size]}"
    if (path / "config.json").exists():
        return path
    ours = make_config(PRESET[size])
    shape = dict(vocab_size=ours.vocab_size, n_embd=ours.hidden_size, n_layer=ours.num_hidden_layers,
                 n_head=ours.num_attention_heads, n_positions=ours.max_position_embeddings,
                 activation_function="gelu", tie_word_embeddings=False, bos_token_id=ours.bos_token_id,
                 eos_token_id=ours.eos_token_id)
    config_class, model_class, extra = {
        "gpt2": (GPT2Config, GPT2LMHeadModel, {}),
        "gptj": (GPTJConfig, GPTJForCausalLM, {"rotary_dim": ours.head_dim}),
    }[kind]
    with torch.device("meta"):
        model = model_class(config_class(**shape, **extra))
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def random_prompts(count: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 0xD000, (count, length), generator=generator).tolist()


def worker(kind: str, request: dict, env: dict | None = None) -> dict:
    """Run `bench.workers` in a fresh process and return its result."""
    proc = subprocess.run([sys.executable, "-m", "bench.workers", kind, json.dumps(request)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise RuntimeError(f"bench worker {kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
