"""Batch-1 decode vs the memory-bandwidth limit.

    python -m bench.decode_bandwidth [--size smoke|full]

Measures the machine's read bandwidth (the fastest of summing a large tensor and a
matrix-vector product over it, fp32 and bf16: the decode access pattern), computes the limit tokens/s = bandwidth /
bytes of weights read per token, and reports the plugin's batch-1 decode rate (prefill
excluded) as a fraction of it, fp32 and bf16. Target: >= 85%.
"""

import torch
from tqdm import tqdm

from bench.common import best_time, parser, report
from bench.run import random_prompts, table_free_checkpoint, worker
from model_impl.checkpoint import make_config, tensor_shapes

SIZES = {"full": (256 << 20, 128), "smoke": (8 << 20, 4)}  # floats summed, new tokens


def read_bandwidth(numel: int) -> float:
    """Bytes per second read by the fastest streaming probe over tensors far larger than the caches."""
    rates = []
    for dtype in (torch.float32, torch.bfloat16):
        data = torch.ones(numel, dtype=dtype)
        matrix, vector = data.view(-1, 4096), torch.ones(4096, dtype=dtype)
        size = data.numel() * data.element_size()
        rates += [size / best_time(lambda: data.sum(), repeats=5), size / best_time(lambda: matrix @ vector, repeats=5)]
    return max(rates)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    numel, new = SIZES[args.size]
    model = table_free_checkpoint(args.size)
    preset = {"smoke": "tiny", "full": "card"}[args.size]
    parameters = sum(torch.Size(s).numel() for s in tensor_shapes(make_config(preset)).values())
    prompt = random_prompts(1, 32)
    rows = []
    bandwidth = read_bandwidth(numel)
    for dtype in tqdm([torch.float32, torch.bfloat16], desc="dtypes"):
        weight_bytes = parameters * torch.finfo(dtype).bits // 8
        limit = bandwidth / weight_bytes
        name = str(dtype).removeprefix("torch.")
        r = worker("vllm", {"model": str(model), "dtype": name, "prompts": prompt, "max_tokens": new, "mode": "single"})
        rows.append({"dtype": name, "bandwidth_GB_s": bandwidth / 1e9, "weight_GB": weight_bytes / 1e9,
                     "limit_tok_s": limit, "decode_tok_s": r["decode_tokens_per_s"],
                     "fraction": r["decode_tokens_per_s"] / limit, "target": ">= 0.85",
                     "met": r["decode_tokens_per_s"] / limit >= 0.85})
    report("decode_bandwidth", args.size, rows, args.out, {"parameters": parameters, "new_tokens": new})


if __name__ == "__main__":
    main()
