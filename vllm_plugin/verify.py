"""`tablefree verify DST --reference SRC`: this project's vLLM engine on DST vs SRC's own code.

Greedy tokens and top-5 logprobs on fixed prompts (text, and random ids over the whole
vocabulary up to the context length), float32 on both sides. Any disagreement beyond
float noise fails, and is localised: SRC and DST (through model_impl) run the failing
prompt, and the first place that differs is named (input codes, a block, the logits).
"""

import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from model_impl.convert.families import map_layout
from model_impl.convert.localise import compare_places, first_difference
from model_impl.convert.source import load_remote_model, open_source

from .parity import LOGPROB_ATOL, Completion, ParityReport, compare, completions, greedy_reference

TEXT = (
    "Question: What is the capital of UK?\nAnswer: London. The table-free model reads every token as a fixed "
    "binary code, recoded by an affine map over GF(2), then expanded to the model width. "
)
KV_BLOCK = 16  # vLLM's default KV block size: each sequence rounds up to it


def verify_prompts(tokenizer, vocab: int, context_length: int, new_tokens: int) -> list[tuple[str, list[int]]]:
    """(kind, ids): two text prompts, three random ones of 1, 37 and context - new_tokens ids."""
    longest = context_length - new_tokens
    if longest < 1:
        raise ValueError(f"context length {context_length} leaves no room for {new_tokens} new tokens")
    text = tokenizer.encode(TEXT * 3)  # > 200 tokens
    generator = torch.Generator().manual_seed(0)
    prompts = [("text", text[: min(8, longest)]), ("text", text[: min(200, longest)])]
    for n in (1, min(37, longest), longest):
        prompts.append(("random ids", torch.randint(0, vocab, (n,), generator=generator).tolist()))
    return prompts


def vllm_greedy(dst: Path, prompts: list[list[int]], new_tokens: int, context_length: int, config) -> list[Completion]:
    """This project's engine on DST, in this process, float32 (no second engine may start here)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the table is the output
    from vllm import LLM, SamplingParams

    tokens = max(sum(len(p) + new_tokens for p in prompts), context_length) + KV_BLOCK * len(prompts)
    kv_bytes = tokens * config.num_hidden_layers * 2 * config.hidden_size * 4
    llm = LLM(model=str(dst), dtype="float32", enforce_eager=True, max_model_len=context_length,
              kv_cache_memory_bytes=kv_bytes, seed=0)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, logprobs=5, ignore_eos=True)
    return completions(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))


@dataclass
class Row:
    kind: str
    prompt: list[int]
    report: ParityReport
    new_tokens: int
    reference_tokens: list[int]
    vllm: Completion

    @property
    def ok(self) -> bool:
        return not self.report.failures

    def as_dict(self) -> dict:
        return {"kind": self.kind, "prompt": self.prompt, "reference_tokens": self.reference_tokens,
                "vllm_tokens": self.vllm[0], "vllm_top_logprobs": self.vllm[1],
                "max_logprob_diff": self.report.max_logprob_diff,
                "ok": self.ok, "failures": self.report.failures}

    def cells(self, index: int) -> list[str]:
        first = "-" if self.ok else self.report.failures[0].split(": ", 1)[-1]
        return [str(index), self.kind, str(len(self.prompt)), f"{self.report.tokens_compared}/{self.new_tokens}",
                f"{self.report.max_logprob_diff:.1e}", "ok" if self.ok else "DIFFERS", first]


def table(rows: list[Row]) -> list[str]:
    header = ["prompt", "kind", "tokens", "greedy equal", "max |d logprob|", "result", "first difference"]
    cells = [header] + [row.cells(i) for i, row in enumerate(rows)]
    widths = [max(len(line[c]) for line in cells) for c in range(len(header))]
    return ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]


def localise(dst: Path, reference: str, prompt: list[int]) -> str:
    """The first place where DST (through model_impl) and SRC differ on `prompt`."""
    from transformers import AutoModelForCausalLM

    import model_impl  # noqa: F401  registers this project's Auto classes

    source = open_source(reference)
    src_model = load_remote_model(source)
    ours = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    places = compare_places(src_model, map_layout(source.tensors), ours, torch.tensor([prompt]))
    bad = first_difference(places)
    if bad is None:
        worst = max(p.relative for p in places)
        return (f"model_impl on DST agrees with SRC everywhere (max relative {worst:.1e}): the difference is in"
                " the vLLM plugin or engine")
    return f"first difference at {bad.name} ({bad.where}): relative {bad.relative:.1e}"


def verify(dst: str | Path, reference: str, new_tokens: int = 16, atol: float | None = None,
           report: str | Path | None = None) -> bool:
    """Prints the comparison table (and, on disagreement, where it starts); True when DST agrees with SRC.

    `report`: also write the prompts, both sides' tokens and the verdict there as JSON.
    """
    from transformers import AutoConfig, AutoTokenizer

    import model_impl  # noqa: F401  registers this project's config classes

    dst, atol = Path(dst), LOGPROB_ATOL if atol is None else atol
    config = AutoConfig.from_pretrained(dst)
    context = config.max_position_embeddings
    prompts = verify_prompts(AutoTokenizer.from_pretrained(dst), config.vocab_size, context, new_tokens)
    ids = [p for _, p in prompts]
    print(f"reference: {reference} through its own remote code (Transformers, float32, CPU)")
    src_model = load_remote_model(open_source(reference))
    refs = greedy_reference(src_model, ids, new_tokens)
    del src_model
    gc.collect()
    print(f"engine: vLLM with this project's plugin on {dst} (float32, context {context})")
    got = vllm_greedy(dst, ids, new_tokens, context, config)
    rows = [Row(kind, p, compare([ref], [out], atol), new_tokens, ref.tokens, out)
            for (kind, p), ref, out in zip(prompts, refs, got)]
    for line in table(rows):
        print(line)
    compared = sum(r.report.tokens_compared for r in rows)
    worst = max(r.report.max_logprob_diff for r in rows)
    ties = sum(r.report.near_ties for r in rows)
    passed = all(r.ok for r in rows)
    where = None
    if passed:
        print(f"verify: PASS: {len(rows)} prompts, {compared} greedy tokens equal ({ties} near ties),"
              f" top-5 logprobs within {worst:.1e} (tolerance {atol:g})")
    else:
        print(f"verify: FAIL: {sum(not r.ok for r in rows)} of {len(rows)} prompts differ beyond float noise"
              f" (tolerance {atol:g})")
        where = localise(dst, reference, next(r.prompt for r in rows if not r.ok))
        print(f"localising on the first failing prompt: {where}")
    if report:
        Path(report).write_text(json.dumps({"pass": passed, "atol": atol, "localisation": where,
                                            "prompts": [r.as_dict() for r in rows]}, indent=1))
    return passed
