"""Servers under test, as real processes on 127.0.0.1: started, awaited, stopped by PID."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


@contextmanager
def live_server(
    cmd: list[str], port: int, env: dict | None = None, timeout: float = 300, cwd=None
) -> Iterator[str]:
    """Run `cmd` (a server on `port`) in its own session; yield its base URL once /health is 200.

    On exit the whole session gets SIGTERM, and the test fails if any process of it is left.
    """
    log = tempfile.TemporaryFile()  # not a pipe: a chatty server must never block on a full one
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                              cwd=cwd, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited {server.returncode}: {_read(log).decode()[-6000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become healthy")
            time.sleep(0.5)
        yield base
    finally:
        alive = _stop_session(server)
        log.close()
    assert not alive, f"left running after SIGTERM: {alive}"


def _stop_session(leader: subprocess.Popen) -> list[psutil.Process]:
    """SIGTERM to the session `leader` started; returns (and kills) what was still running after 30 s."""
    group = [p for p in psutil.process_iter() if _session_of(p.pid) == leader.pid]
    os.killpg(leader.pid, signal.SIGTERM)
    leader.wait(timeout=60)
    _, alive = psutil.wait_procs(group, timeout=30)
    for p in alive:
        p.kill()
    return alive


@contextmanager
def ray_head(timeout: float = 120) -> Iterator[dict]:
    """A one-node Ray cluster (`ray start --head --block`) in its own session.

    Yields the environment a Ray driver needs to join it: the address and the cluster's own
    auth token (Ray enables token auth; a token of its own keeps ~/.ray out of the test).
    Ray's GCS and raylet listen on all interfaces: Ray has no loopback-only switch.
    """
    env = {
        "RAY_ADDRESS": f"127.0.0.1:{free_port()}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stop at once, not after Ray's 30 s drain
    }
    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 bytes
    cmd = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", env["RAY_ADDRESS"].split(":")[1], "--ray-client-server-port", str(free_port()),  # not 10001
        "--num-cpus", str(os.cpu_count()), "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp,
    ]
    log = tempfile.TemporaryFile()
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while b"Ray runtime started" not in _read(log):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {_read(log).decode()[-4000:]}")
            time.sleep(0.5)
        yield env
    finally:
        alive = _stop_session(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
    assert not alive, f"left running after SIGTERM: {alive}"


def _read(log) -> bytes:
    log.seek(0)
    return log.read()
