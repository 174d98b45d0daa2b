import os
import subprocess
import sys
from pathlib import Path

import pytest

# Nothing may come from a model hub, and remote code is cached per test session.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# vLLM engines run in the test process (fast start-up, see ../shared/notes/vllm-on-cpu.md);
# apply_model ships a function to the worker, which vLLM only pickles when allowed.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (the README's test command) each worker and every process it starts keep
    # to a core of their own: vLLM's CPU engine would otherwise bind its OpenMP threads to the same
    # cores in both workers, where they spin against each other.
    cores = sorted(os.sched_getaffinity(0))
    core = cores[int(worker.removeprefix("gw")) % len(cores)]
    os.sched_setaffinity(0, {core})
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(core))

REPO = Path(__file__).resolve().parents[1]


def tablefree(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed `tablefree` console script."""
    exe = Path(sys.executable).with_name("tablefree")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=check, timeout=600)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny fp32 checkpoint written by the project's own tool (shared by the session)."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    tablefree("make-checkpoint", str(out), "--preset", "tiny", "--seed", "1")
    return out


KEY = "sk-tablefree-test"
PROMPT = "Question: What is the capital of UK?\nAnswer:"


def serve_cmd(checkpoint, port: int, *extra: str) -> list[str]:
    """`tablefree serve` for tests: exact fp32, a small KV cache."""
    return [sys.executable, "-m", "server.cli", "serve", "--model", str(checkpoint), "--port", str(port),
            "--dtype", "float32", "--max-model-len", "512", "--kv-cache-gb", "0.25", *extra]


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="session")
def server(tiny_checkpoint):
    """The main server of the test session: the tiny checkpoint as "tiny", behind an API key."""
    from .live_server import free_port, live_server

    pytest.importorskip("vllm")
    port = free_port()
    with live_server(serve_cmd(tiny_checkpoint, port, "--api-key", KEY, "--served-model-name", "tiny"), port) as base:
        yield base
