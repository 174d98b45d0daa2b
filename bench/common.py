"""Shared by the benchmarks: results as a printed table and a JSON file, and small timing helpers.

Machines here are noisy, so every benchmark measures the systems it compares side by side in
one run and reports their ratio next to the absolute numbers.
"""

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", choices=["smoke", "full"], default="full", help="smoke: the smallest run, for CI")
    p.add_argument("--out", type=Path, help="JSON results file (default: bench/results/<name>-<size>.json)")
    return p


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn` over `repeats` runs, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name: str, size: str, rows: list[dict], out: Path | None, notes: dict | None = None) -> Path:
    """Print `rows` as a table and write them, with the machine and date, as JSON."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths)))
    out = out or RESULTS / f"{name}-{size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"benchmark": name, "size": size, "date": date.today().isoformat(), "machine": platform.machine(),
            "cpus": torch.get_num_threads(), "torch": torch.__version__, **(notes or {})}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"results: {out}")
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
