"""Decode speed of vLLM's compiled path (torch.compile, Inductor) vs eager, on this machine's CPU.

    python -m bench.compiled_vs_eager [--size smoke|full] [--dtypes float32,bfloat16] [--batches 1,32]

The plugin on the card shape: 32-token random prompts, 128 new tokens, temperature 0, EOS ignored;
decode = the rate after the prefill and first token, from medians of 3 timed runs. For each dtype
and batch size the eager and the compiled engine run one right after the other, each in a fresh
process, the compiled one from an empty compile cache (as on a fresh machine); ratio = compiled /
eager decode rate. No target: the ratio says whether compiled, vLLM's default on GPUs, should be
the CPU default too.
"""

import tempfile

from tqdm import tqdm

from bench.common import parser, report
from bench.run import random_prompts, table_free_checkpoint, worker

SIZES = {"full": (32, 128, 3), "smoke": (4, 4, 1)}  # prompt length, new tokens, timed runs (median)


def run(request: dict, eager: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="vllm-cache-") as cache:
        return worker("vllm", {**request, "enforce_eager": eager}, env={"VLLM_CACHE_ROOT": cache})


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batches", default="1,32")
    args = p.parse_args()
    length, new, repeats = SIZES[args.size]
    batches = [int(b) for b in args.batches.split(",")]
    prompts = random_prompts(max(batches), length)
    model = str(table_free_checkpoint(args.size))
    rows = []
    for dtype, batch in tqdm([(d, b) for d in args.dtypes.split(",") for b in batches], desc="dtype x batch"):
        request = {"model": model, "dtype": dtype, "max_tokens": new, "prompts": prompts[:batch], "mode": "batch",
                   "repeats": repeats}
        eager, compiled = run(request, eager=True), run(request, eager=False)
        rows.append({"dtype": dtype, "batch": batch, "eager_tok_s": eager["decode_tokens_per_s"],
                     "compiled_tok_s": compiled["decode_tokens_per_s"],
                     "ratio": compiled["decode_tokens_per_s"] / eager["decode_tokens_per_s"],
                     "eager_start_s": eager["start_seconds"], "compiled_start_s": compiled["start_seconds"]})
    report("compiled_vs_eager", args.size, rows, args.out, {"prompt_len": length, "new_tokens": new, "repeats": repeats})


if __name__ == "__main__":
    main()
