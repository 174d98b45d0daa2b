"""Timed generation in a process of its own (one engine per process, fresh threads and memory).

    python -m bench.workers vllm|transformers '<json request>'   -> prints `RESULT <json>`

request: {"model": dir, "dtype": "float32"|"bfloat16", "prompts": [[ids]], "max_tokens": N,
          "mode": "batch" | "single", "kv_cache_bytes": N, "enforce_eager": true (default) | false,
          "repeats": N (default 1; times are medians over N runs)}
result: {"tokens": generated tokens, "seconds": generation time (after a warm-up), ...}
"""

import json
import os
import sys
import time

import torch

from bench.common import best_time


def run_vllm(req: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=req["model"], dtype=req["dtype"], enforce_eager=req.get("enforce_eager", True), max_model_len=1024,
              seed=0, kv_cache_memory_bytes=req.get("kv_cache_bytes", 2 << 30))
    start_seconds = time.perf_counter() - start  # load, and compile when not eager
    params = SamplingParams(temperature=0, max_tokens=req["max_tokens"], ignore_eos=True)
    first_token = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    batches = [req["prompts"]] if req["mode"] == "batch" else [[p] for p in req["prompts"]]

    def generate(batch, sampling):
        return llm.generate([{"prompt_token_ids": p} for p in batch], sampling, use_tqdm=False)

    def run_all(sampling):
        return [o for batch in batches for o in generate(batch, sampling)]

    tokens = sum(len(o.outputs[0].token_ids) for o in run_all(params))  # warm-up; greedy, so every run's count
    repeats = req.get("repeats", 1)
    seconds = best_time(lambda: run_all(params), repeats, warmup=0)
    # Prefill + first token alone, to separate the decode rate (batch-1 bandwidth benchmark).
    first_seconds = best_time(lambda: run_all(first_token), repeats, warmup=0)
    return {"tokens": tokens, "seconds": seconds, "first_token_seconds": first_seconds, "start_seconds": start_seconds,
            "decode_tokens_per_s": (tokens - len(req["prompts"])) / max(seconds - first_seconds, 1e-9)}


@torch.no_grad()
def run_transformers(req: dict) -> dict:
    from transformers import AutoModelForCausalLM

    import model_impl  # noqa: F401  registers the Auto classes

    dtype = getattr(torch, req["dtype"])
    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # ignore EOS, like vLLM's ignore_eos
    batches = [req["prompts"]] if req["mode"] == "batch" else [[p] for p in req["prompts"]]

    def generate(batch):  # equal-length prompts: a static batch needs no padding
        out = model.generate(torch.tensor(batch), max_new_tokens=req["max_tokens"], do_sample=False)
        return out[:, len(batch[0]):].numel()

    generate([batches[0][0]])  # warm-up
    start = time.perf_counter()
    tokens = sum(generate(batch) for batch in batches)
    return {"tokens": tokens, "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    kind, request = sys.argv[1], json.loads(sys.argv[2])
    result = {"vllm": run_vllm, "transformers": run_transformers}[kind](request)
    print("RESULT " + json.dumps(result), flush=True)
