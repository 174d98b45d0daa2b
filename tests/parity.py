"""Greedy parity between vLLM and model_impl's Transformers model.

The near-tie rule follows vLLM's own `check_logprobs_close`: where the two sides pick
different tokens, each pick must be in the other side's top-2 with a logprob gap under
1e-4; the comparison of that sequence stops there and the case is counted.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import model_impl  # noqa: F401  registers the Auto classes

TIE_GAP = 1e-4
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


@dataclass
class Reference:
    tokens: list[int]
    logprobs: torch.Tensor  # (steps, vocab), log_softmax of the raw logits


@torch.no_grad()
def transformers_greedy(checkpoint, prompts: list[list[int]], max_new_tokens: int) -> list[Reference]:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # like vLLM's ignore_eos
    refs = []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        logprobs = torch.log_softmax(torch.stack(out.logits, 1)[0].float(), -1)
        refs.append(Reference(out.sequences[0, len(prompt) :].tolist(), logprobs))
    return refs


@dataclass
class ParityReport:
    sequences: int = 0
    tokens_compared: int = 0
    near_ties: int = 0
    max_logprob_diff: float = 0.0
    failures: list[str] = field(default_factory=list)


Completion = tuple[list[int], list[dict[int, float]]]  # tokens, top logprobs per step


def completions(outputs) -> list[Completion]:
    """vLLM RequestOutputs -> (tokens, [{token: logprob}] per step), JSON-friendly."""
    return [
        (list(o.outputs[0].token_ids), [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
        for o in outputs
    ]


def compare(refs: list[Reference], got_completions: list[Completion], atol: float = 1e-3) -> ParityReport:
    """`got_completions`: greedy vLLM outputs with `logprobs` >= 2, as `completions` gives them."""
    report = ParityReport()
    for seq, (ref, (tokens, tops)) in enumerate(zip(refs, got_completions, strict=True)):
        report.sequences += 1
        for step, (want, got) in enumerate(zip(ref.tokens, tokens, strict=True)):
            top = tops[step]  # token id -> logprob, the sampled token included
            ref_lp = ref.logprobs[step]
            if got != want:
                ref_top2 = ref_lp.topk(2).indices.tolist()
                vllm_top2 = sorted(top, key=lambda t: -top[t])[:2]
                tie = (
                    got in ref_top2
                    and want in vllm_top2
                    and abs(ref_lp[got] - ref_lp[want]) < TIE_GAP
                    and abs(top[got] - top[want]) < TIE_GAP
                )
                if not tie:
                    report.failures.append(f"sequence {seq} step {step}: vLLM {got}, Transformers {want}")
                report.near_ties += tie
                break
            report.tokens_compared += 1
            for token, lp in top.items():
                diff = abs(lp - ref_lp[token].item())
                report.max_logprob_diff = max(report.max_logprob_diff, diff)
                if diff > atol:
                    report.failures.append(f"sequence {seq} step {step} token {token}: logprob diff {diff:.2e}")
    return report


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
    proc = subprocess.run(
        [sys.executable, "-m", "tests.vllm_generate", json.dumps(request)],
        cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600,
    )
    if proc.returncode:
        raise EngineFailed(proc.stdout + proc.stderr)
    lines = {line[:6]: json.loads(line[7:]) for line in proc.stdout.splitlines() if line[:7] in ("ENGINE ", "RESULT ")}
    got = [(tokens, [{int(t): lp for t, lp in step.items()} for step in tops]) for tokens, tops in lines["RESULT"]]
    return EngineRun(got, lines["ENGINE"])


def generate_in_subprocess(checkpoint, prompts, env: dict | None = None, **engine) -> list[Completion]:
    return run_in_subprocess(checkpoint, prompts, env, **engine).completions
