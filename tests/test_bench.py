"""Smoke runs of every benchmark at its smallest size, so they do not rot (no timing asserted)."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

pytest.importorskip("vllm")

BENCHMARKS = {
    "codes_vs_embedding": [],
    "engine_throughput": ["--dtypes", "float32", "--single-prompts", "1"],
    "decode_bandwidth": [],
    "server_vs_vllm": [],
    "cold_start": [],
    "compiled_vs_eager": ["--dtypes", "float32", "--batches", "2"],
}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_smoke_run_writes_its_table_and_json(name, tmp_path):
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "TABLEFREE_CACHE": str(tmp_path.parent / "bench-cache")}
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", "--size", "smoke", "--out", str(out),
                           *BENCHMARKS[name]], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["meta"]["benchmark"] == name and result["rows"]
    assert f"results: {out}" in proc.stdout
