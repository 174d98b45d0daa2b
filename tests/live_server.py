"""Servers under test, as real processes on 127.0.0.1: started, awaited, stopped by PID."""

import os
import re
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


def session_processes(leader: int) -> list[psutil.Process]:
    """Every process in the session `leader` started (servers run with start_new_session)."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == leader:
                found.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


class ServerProcess:
    """A server command in its own session, its output in a temporary file (never a pipe it could fill)."""

    def __init__(self, cmd: list[str], port: int, env: dict | None = None, cwd=None, verify=True,
                 scheme: str = "http") -> None:
        self.base, self.verify = f"{scheme}://127.0.0.1:{port}", verify
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     cwd=cwd, start_new_session=True)

    def output(self) -> str:
        return _read(self.log).decode(errors="replace")

    def wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.output()[-6000:]}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2, verify=self.verify).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become healthy")
            time.sleep(0.5)

    def stop(self) -> list[psutil.Process]:
        """SIGTERM to the whole session; returns what is still running after 30 s (then killed)."""
        alive = _stop_session(self.proc)
        self.log.close()
        return alive


@contextmanager
def live_server(cmd: list[str], port: int, env: dict | None = None, timeout: float = 300, cwd=None,
                **tls) -> Iterator[str]:
    """Run `cmd` (a server on `port`); yield its base URL once /health is 200 (`tls`: scheme, verify).

    On exit the whole session gets SIGTERM, and the test fails if any process of it is left.
    """
    server = ServerProcess(cmd, port, env, cwd, **tls)
    try:
        server.wait_healthy(timeout)
        yield server.base
    finally:
        alive = server.stop()
    assert not alive, f"left running after SIGTERM: {alive}"


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def wait_for_metric(base: str, name: str, value: float, within: float) -> float:
    """The metric once it equals `value`, or its last reading after `within` seconds."""
    deadline = time.monotonic() + within
    while (current := metric(base, name)) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    return current


def _stop_session(leader: subprocess.Popen) -> list[psutil.Process]:
    """SIGTERM to the session `leader` started; returns (and kills) what was still running after 30 s."""
    group = session_processes(leader.pid)
    if leader.poll() is None:
        os.killpg(leader.pid, signal.SIGTERM)
    leader.wait(timeout=90)
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
