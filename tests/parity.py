"""Parity helpers for the tests: prompts, engine settings, engines in subprocesses.

The comparison itself lives in vllm_plugin.parity (`tablefree verify` uses it too).
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import model_impl  # noqa: F401  registers the Auto classes
from vllm_plugin.parity import TIE_GAP, Completion, Reference, compare, completions, greedy_reference  # noqa: F401  re-exported

REPO = Path(__file__).resolve().parents[1]


def mixed_prompts(tokenizer, count: int = 8) -> list[list[int]]:
    """Prompts of 1 to ~250 tokens: half text, half random ids over the whole vocabulary."""
    text = (
        "Question: What is the capital of UK?\nAnswer: London. The table-free model reads every token "
        "as a fixed binary code, recoded by an affine map over GF(2), then tiled to the model width. "
    ) * 8
    ids = tokenizer.encode(text)
    generator = torch.Generator().manual_seed(0)
    lengths = [1, 3, 9, 17, 40, 90, 160, 250, 5, 64][:count]
    prompts = []
    for i, n in enumerate(lengths):
        if i % 2:
            prompts.append(torch.randint(0, 65536, (n,), generator=generator).tolist())
        else:
            prompts.append(ids[:n])
    return prompts


def transformers_greedy(checkpoint, prompts: list[list[int]], max_new_tokens: int) -> list[Reference]:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return greedy_reference(model, prompts, max_new_tokens)


NEW_TOKENS = 32


def engine_settings(checkpoint, **overrides) -> dict:
    """vLLM engine arguments for test checkpoints: exact fp32, eager, a small explicit KV cache."""
    settings = dict(
        model=str(checkpoint), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20, max_model_len=512, seed=0
    )
    return {**settings, **overrides}


def backbone_compiled(model) -> bool:
    """Whether a worker's TableFreeModel went through vLLM's torch.compile wrapper (eager engines never
    set up the wrapper). For `apply_model`, which pickles the function by name: so it lives here."""
    return getattr(model.model, "compiled", False)


def greedy_params(**overrides):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=5, ignore_eos=True, **overrides)


class EngineFailed(RuntimeError):
    """An engine process failed: `output` is all it wrote (vLLM logs, its workers' errors included,
    go to stdout; the traceback to stderr), the message the end of that."""

    def __init__(self, output: str) -> None:
        super().__init__(output[-6000:])
        self.output = output


@dataclass
class EngineRun:
    completions: list[Completion]
    facts: dict  # the engine's effective settings, as `tests.vllm_generate.facts` reads them


def run_in_subprocess(checkpoint, prompts, env: dict | None = None, **engine) -> EngineRun:
    """Greedy completions from an engine in a process of its own, and what that engine ran.

    In-process engines share vLLM's global state, so the test process holds only the
    default engine; every other setting gets a fresh process.
    """
    request = {"checkpoint": str(checkpoint), "prompts": prompts, "engine": engine}
    lines = run_module("tests.vllm_generate", request, ("ENGINE", "RESULT"), env)
    got = [(tokens, [{int(t): lp for t, lp in step.items()} for step in tops]) for tokens, tops in lines["RESULT"]]
    return EngineRun(got, lines["ENGINE"])


def run_module(module: str, request: dict, tags: tuple[str, ...], env: dict | None = None) -> dict:
    """`python -m module '<request as JSON>'` from the repository root: the JSON of the lines it
    prints as `TAG <json>` for each of `tags` (EngineFailed with all its output if it fails)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, json.dumps(request)],
        cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600,
    )
    if proc.returncode:
        raise EngineFailed(proc.stdout + proc.stderr)
    tagged = (line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in tags)
    return {tag: json.loads(body) for tag, body in tagged}


def generate_in_subprocess(checkpoint, prompts, env: dict | None = None, **engine) -> list[Completion]:
    return run_in_subprocess(checkpoint, prompts, env, **engine).completions
