"""The CPU image, run the way the README's `docker run` lines run it (marker `docker`).

The image comes from scripts/docker-local.sh, which builds it and sets TABLEFREE_DOCKER_IMAGE:
    bash scripts/docker-local.sh .venv/bin/python -m pytest -q -m docker
Each container starts from a README line: the image tag, the volume name, the checkpoint path
and `-p 8000:8000` are replaced (by host networking where the engine has no bridge, as a private
engine has not); every other flag, variable and argument is the README's.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest

from .live_server import free_port, live_server
from .test_docker import readme_docker_lines

IMAGE = os.environ.get("TABLEFREE_DOCKER_IMAGE")
LABEL = os.environ.get("TABLEFREE_DOCKER_LABEL", "tablefree-test")
README_TAG = "tablefree:cpu"
CACHE = "/home/tablefree/.cache"
DEMO_DIR = f"{CACHE}/tablefree"
BUILDING_DEMO = "building the card-shaped demo checkpoint"
PROMPTS = ["Question: What is the capital of UK?\nAnswer:", "Once upon a time,", "a"]

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(not IMAGE, reason="needs the CPU image: bash scripts/docker-local.sh "
                                         ".venv/bin/python -m pytest -q -m docker"),
]


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {shlex.join(args)} exited {proc.returncode}: {proc.stderr[-3000:]}")
    return proc


@dataclass
class Container:
    id: str
    url: str

    def logs(self) -> str:
        proc = docker("logs", self.id)
        return proc.stdout + proc.stderr

    def state(self) -> dict:
        return json.loads(docker("inspect", "--format", "{{json .State}}", self.id).stdout)

    def exec(self, *cmd: str) -> str:
        return docker("exec", self.id, *cmd).stdout

    def wait_healthy(self, timeout: float) -> None:
        """Until /health answers 200; fails with the logs if the container stops first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if not self.state()["Running"]:
                raise RuntimeError(f"container exited: {self.logs()[-6000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not serving after {timeout} s: {self.logs()[-6000:]}")
            time.sleep(1)


def readme_run(kind: str) -> list[str]:
    """The README's CPU `docker run` line with a mounted checkpoint ("model") or without ("demo")."""
    (line,) = [line for line in readme_docker_lines() if line.startswith("docker run") and f" {README_TAG}" in line
               and ("TABLEFREE_MODEL=" in line) == (kind == "model")]
    return shlex.split(line)[2:]


@pytest.fixture(scope="module")
def host_network() -> bool:
    """A private engine (scripts/docker-local.sh) has no bridge network: containers share the host's."""
    return docker("network", "inspect", "bridge", check=False).returncode != 0


@pytest.fixture(scope="module")
def start(host_network):
    """start(kind, *serve_args, volume=, checkpoint=): a container from the README line, removed afterwards."""
    @contextmanager
    def run(kind: str, *serve_args: str, volume: str = "", checkpoint=None) -> Iterator[Container]:
        port = free_port()
        options, extra = [], list(serve_args)
        words = readme_run(kind)
        image_at = words.index(README_TAG)
        for word in words[:image_at]:
            if word == "8000:8000":  # the value of -p
                options[-1:] = ["--network", "host"] if host_network else ["-p", f"127.0.0.1:{port}:8503"]
                continue
            if word.startswith("tablefree-cache:"):
                word = word.replace("tablefree-cache", volume, 1)
            if word.startswith("/path/to/checkpoint:"):
                word = word.replace("/path/to/checkpoint", str(checkpoint), 1)
            options.append(word)
        # The served port differs from TABLEFREE_PORT (8000): the HEALTHCHECK must follow --port.
        extra += ["--host", "127.0.0.1", "--port", str(port)] if host_network else ["--port", "8503"]
        cid = docker("run", "-d", "--label", LABEL, *options, IMAGE, *words[image_at + 1:], *extra).stdout.strip()
        try:
            yield Container(cid, f"http://127.0.0.1:{port}")
        finally:
            docker("rm", "-f", cid, check=False)

    return run


@pytest.fixture(scope="module")
def volume() -> Iterator[str]:
    name = f"tablefree-test-{uuid.uuid4().hex[:8]}"
    docker("volume", "create", "--label", LABEL, name)
    yield name
    docker("volume", "rm", "-f", name, check=False)


def api_key(kind: str) -> str:
    (env,) = [w for w in readme_run(kind) if w.startswith("TABLEFREE_API_KEY=")]
    return env.split("=", 1)[1]


def served_name(kind: str) -> str:
    words = readme_run(kind)
    return words[words.index("--served-model-name") + 1]


@pytest.fixture(scope="module")
def served(start, tiny_checkpoint) -> Iterator[Container]:
    """The README's checkpoint line on the tiny checkpoint (read-only), exact fp32 for the comparison."""
    with start("model", "--dtype", "float32", checkpoint=tiny_checkpoint) as container:
        container.wait_healthy(timeout=600)
        yield container


def completions(base: str, key: str, model: str, logs=lambda: "") -> list[dict]:
    body = {"model": model, "prompt": PROMPTS, "max_tokens": 24, "temperature": 0, "logprobs": 1, "ignore_eos": True}
    response = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)
    assert response.status_code == 200, response.text + logs()[-8000:]
    return sorted(response.json()["choices"], key=lambda c: c["index"])


def test_serves_the_mounted_checkpoint_as_it_is_served_outside_docker(served, tiny_checkpoint):
    key, name = api_key("model"), served_name("model")
    assert httpx.get(f"{served.url}/health", timeout=5).status_code == 200
    assert httpx.get(f"{served.url}/v1/models", timeout=5).status_code == 401  # TABLEFREE_API_KEY reached it
    models = httpx.get(f"{served.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
    assert [m["id"] for m in models["data"]] == [name]  # --served-model-name after the image name reached it
    inside = completions(served.url, key, name, served.logs)
    port = free_port()
    outside_cmd = [str(shutil.which("tablefree", path=os.path.dirname(sys.executable))), "serve",
                   "--model", str(tiny_checkpoint), "--port", str(port), "--dtype", "float32",
                   "--served-model-name", name, "--api-key", key]
    with live_server(outside_cmd, port) as base:
        outside = completions(base, key, name)
    assert [c["text"] for c in inside] == [c["text"] for c in outside]
    assert [c["logprobs"]["tokens"] for c in inside] == [c["logprobs"]["tokens"] for c in outside]
    for a, b in zip(inside, outside):
        assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=1e-3)


def test_every_process_runs_as_uid_1000(served):
    uids = served.exec("sh", "-c", "grep -h '^Uid:' /proc/[0-9]*/status").split()
    assert set(uids) - {"Uid:"} == {"1000"} and uids.count("Uid:") >= 3  # tini, the server, this grep at least
    assert served.exec("cat", "/proc/1/cmdline").split("\0")[:1] == ["tini"]


def test_healthcheck_is_healthy_on_the_port_given_after_the_image_name(served):
    deadline = time.monotonic() + 120  # the first check runs 30 s (--interval) after the start
    while (health := served.state()["Health"])["Status"] != "healthy":
        assert time.monotonic() < deadline, health
        time.sleep(2)
    assert health["Log"][-1]["ExitCode"] == 0


PROCESSES = """
import importlib.util, json, os
found = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) in (1, os.getpid()):
        continue
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().decode().replace("\\0", " ")
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    found[cmdline] = [lib for lib in ("libtcmalloc_minimal.so", "libiomp5.so") if lib in maps]
print(json.dumps({"processes": found, "triton": importlib.util.find_spec("triton") is not None}))
"""


def test_tcmalloc_and_intel_openmp_are_preloaded_and_triton_left_out(served):
    report = json.loads(served.exec("python", "-c", PROCESSES))
    assert report["triton"] is False
    servers = {cmd: libs for cmd, libs in report["processes"].items() if "tablefree serve" in cmd}
    assert servers and all(libs == ["libtcmalloc_minimal.so", "libiomp5.so"] for libs in servers.values()), report
    assert "not found in LD_PRELOAD" not in served.logs()


def stream_until_done(url: str, key: str, model: str, started: threading.Event) -> list[str]:
    """The `data:` payloads of one long streamed completion, to the end of the stream."""
    body = {"model": model, "prompt": "Once upon a time,", "max_tokens": 900, "ignore_eos": True, "stream": True}
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                started.set()
    return events


def test_plain_docker_stop_ends_streams_in_flight_and_exits_0(start, tiny_checkpoint):
    key, name = api_key("model"), served_name("model")
    words = readme_run("model")
    stop_timeout = int(words[words.index("--stop-timeout") + 1])
    with start("model", checkpoint=tiny_checkpoint) as container:
        container.wait_healthy(timeout=600)
        started = [threading.Event() for _ in range(4)]
        with ThreadPoolExecutor(len(started)) as pool:
            streams = [pool.submit(stream_until_done, container.url, key, name, s) for s in started]
            assert all(s.wait(timeout=120) for s in started)
            began = time.monotonic()
            docker("stop", container.id)  # SIGTERM, then SIGKILL after the container's --stop-timeout
            stopped_after = time.monotonic() - began
            results = [s.result(timeout=60) for s in streams]
        state = container.state()
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, stopped_after)
    assert stopped_after < stop_timeout
    for events in results:
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert "error" in last or last["choices"][0]["finish_reason"] == "length", last
        assert all("choices" in json.loads(e) for e in events[:-2])


def demo_files(container: Container) -> list[str]:
    return sorted(container.exec("find", DEMO_DIR, "-type", "f", "-printf", "%P %s %T@\n").splitlines())


def test_demo_is_built_into_the_cache_volume_once(start, volume):
    with start("demo", volume=volume) as first:
        first.wait_healthy(timeout=1800)
        built = demo_files(first)
        logs = first.logs()
        models = httpx.get(f"{first.url}/v1/models", timeout=5).json()
        docker("stop", first.id)
        assert first.state()["ExitCode"] == 0
    assert BUILDING_DEMO in logs
    assert "Attempted to load weight" not in logs  # built in the dtype it is served in
    assert [m["id"] for m in models["data"]] == ["tablefree-demo-random-weights"]
    assert any(f.split()[0].endswith(".safetensors") for f in built)
    with start("demo", volume=volume) as second:
        second.wait_healthy(timeout=900)
        assert BUILDING_DEMO not in second.logs()
        assert demo_files(second) == built  # same files, sizes and modification times


def test_unreadable_checkpoint_stops_the_container_naming_the_file(start, tiny_checkpoint, tmp_path):
    if os.geteuid() == 1000:
        pytest.skip("the files would belong to the container's own user")
    checkpoint = tmp_path / "closed"
    shutil.copytree(tiny_checkpoint, checkpoint)
    (checkpoint / "model.safetensors").chmod(0o600)
    with start("model", checkpoint=checkpoint) as container:
        deadline = time.monotonic() + 300
        while container.state()["Running"]:
            assert time.monotonic() < deadline
            time.sleep(1)
        assert container.state()["ExitCode"] != 0
        logs = container.logs()
    (mount,) = [w.split(":")[1] for w in readme_run("model") if w.startswith("/path/to/checkpoint:")]
    assert f"checkpoint {mount} is not readable by uid 1000: {mount}/model.safetensors (-rw-------, " \
           f"owner uid {os.geteuid()})" in logs
