"""Our server vs vLLM's own OpenAI server, same engine settings and load, driven by vLLM's bench client.

    python -m bench.server_vs_vllm [--size smoke|full] [--dtype bfloat16] [--num-prompts 64] [--concurrency 8]

Both serve the same checkpoint with our plugin; `vllm.benchmarks.serve` (what `vllm bench
serve` runs) sends the same random-token load, streaming, and reports request throughput,
output tok/s, TTFT, TPOT, ITL and E2E latency (mean, median, p99).
Targets: our throughput >= 0.97x and median TTFT <= 1.05x of vLLM's server.
"""

import sys

from tqdm import tqdm

from bench.common import parser, report
from bench.run import table_free_checkpoint
from tests.live_server import free_port, live_server

SIZES = {"full": (32, 128), "smoke": (4, 4)}  # prompt length, new tokens
METRICS = ["request_throughput", "output_throughput"] + [
    f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p99")
]


def server_commands(model: str, port: int, dtype: str, kv_bytes: int) -> dict[str, list[str]]:
    common = ["--model", model, "--port", str(port), "--dtype", dtype, "--max-model-len", "1024"]
    return {
        "tablefree": [sys.executable, "-m", "server.cli", "serve", *common, "--kv-cache-gb", str(kv_bytes / 2**30)],
        "vllm": [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *common, "--enforce-eager",
                 "--kv-cache-memory-bytes", str(kv_bytes)],
    }


def load(base: str, model: str, prompt_len: int, new: int, num_prompts: int, concurrency: int) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser()
    add_cli_args(p)
    args = p.parse_args([
        "--backend", "openai", "--base-url", base, "--endpoint", "/v1/completions", "--model", model,
        "--tokenizer", model, "--dataset-name", "random", "--random-input-len", str(prompt_len),
        "--random-output-len", str(new), "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--num-warmups", "2",
    ])
    return main(args)


def main_() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-prompts", type=int)
    p.add_argument("--concurrency", type=int)
    args = p.parse_args()
    prompt_len, new = SIZES[args.size]
    num_prompts = args.num_prompts or (64 if args.size == "full" else 4)
    concurrency = args.concurrency or (8 if args.size == "full" else 2)
    model = str(table_free_checkpoint(args.size))
    results = {}
    for name in tqdm(["tablefree", "vllm"], desc="servers"):
        port = free_port()
        cmd = server_commands(model, port, args.dtype, 1 << 30)[name]
        with live_server(cmd, port, timeout=900) as base:
            results[name] = load(base, model, prompt_len, new, num_prompts, concurrency)
    rows = [{"metric": m, "tablefree": results["tablefree"].get(m), "vllm": results["vllm"].get(m),
             "ratio": results["tablefree"].get(m) / results["vllm"].get(m) if results["vllm"].get(m) else None}
            for m in METRICS]
    throughput = results["tablefree"]["output_throughput"] / results["vllm"]["output_throughput"]
    ttft = results["tablefree"]["median_ttft_ms"] / results["vllm"]["median_ttft_ms"]
    rows.append({"metric": "target: throughput ratio >= 0.97", "ratio": throughput, "tablefree": bool(throughput >= 0.97)})
    rows.append({"metric": "target: median TTFT ratio <= 1.05", "ratio": ttft, "tablefree": bool(ttft <= 1.05)})
    report("server_vs_vllm", args.size, rows, args.out,
           {"dtype": args.dtype, "prompt_len": prompt_len, "new_tokens": new, "num_prompts": num_prompts,
            "concurrency": concurrency})


if __name__ == "__main__":
    main_()
