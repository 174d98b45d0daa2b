"""Code generation vs an embedding table: time and memory of turning 8192 ids into inputs.

    python -m bench.codes_vs_embedding [--size smoke|full]

Compares model_impl's TokenCoder (the function vLLM's embed_input_ids calls) with an
nn.Embedding(65536, 1024) lookup, fp32 and bf16, on the CPU (and CUDA when present).
Target: time ratio codes/table <= 1.0.
"""

import torch
from torch import nn
from tqdm import tqdm

from bench.common import best_time, parser, report
from model_impl import TableFreeConfig, TokenCode, TokenCoder

VOCAB, WIDTH = 65536, 1024


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    n_ids, repeats = (8192, 50) if args.size == "full" else (256, 3)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in tqdm(devices, desc="devices"):
        for dtype in (torch.float32, torch.bfloat16):
            ids = torch.randint(0, VOCAB, (n_ids,), device=device)
            coder = TokenCoder(TokenCode.from_config(TableFreeConfig(hidden_size=WIDTH))).to(device)
            table = nn.Embedding(VOCAB, WIDTH, device=device, dtype=dtype)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            with torch.no_grad():
                codes_s = best_time(lambda: (coder(ids, dtype), sync()), repeats)
                table_s = best_time(lambda: (table(ids), sync()), repeats)
            rows.append({
                "device": device, "dtype": str(dtype).removeprefix("torch."), "ids": n_ids,
                "codes_ms": codes_s * 1e3, "table_ms": table_s * 1e3, "time_ratio": codes_s / table_s,
                "codes_state_bytes": sum(b.numel() * b.element_size() for b in coder.buffers()),
                "table_bytes": table.weight.numel() * table.weight.element_size(),
                "target_met": codes_s / table_s <= 1.0,
            })
    report("codes_vs_embedding", args.size, rows, args.out)


if __name__ == "__main__":
    main()
