"""Servers under test, as real processes on 127.0.0.1: started, awaited, stopped by PID."""

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
                log.seek(0)
                raise RuntimeError(f"server exited {server.returncode}: {log.read().decode()[-6000:]}")
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
        group = [p for p in psutil.process_iter() if _session_of(p.pid) == server.pid]
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        _, alive = psutil.wait_procs(group, timeout=30)
        for p in alive:
            p.kill()
        log.close()
    assert not alive, f"left running after SIGTERM: {alive}"
