"""The Dockerfiles, checked without a Docker engine: hadolint, structure, README consistency,
the health check's address, and the GPU image's install against vLLM 0.32's own pins.

tests/test_docker_run.py builds the CPU image and runs it.
"""

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from server.engine import DRAIN_S
from server.settings import ServerSettings

from .conftest import REPO

DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]


def parsed(path: Path) -> DockerfileParser:
    parser = DockerfileParser(fileobj=path.open("rb"))
    return parser


def instructions(path: Path, name: str) -> list[str]:
    return [i["value"] for i in parsed(path).structure if i["instruction"] == name]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing_and_every_ignore_says_why(path):
    hadolint = Path(sys.executable).with_name("hadolint")
    proc = subprocess.run([str(hadolint), "--no-color", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore" in line:
            reason = lines[n - 1] if n else ""
            assert reason.startswith("#") and "hadolint" not in reason, f"{path.name}:{n + 1} ignores without a reason"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_structure(path):
    base = parsed(path).baseimage
    name, _, tag = base.rpartition(":")
    assert name and tag and tag != "latest" and "$" not in base, base
    users = instructions(path, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    for kind in ("ENTRYPOINT", "CMD"):
        (value,) = instructions(path, kind)
        assert isinstance(json.loads(value), list), f"{kind} is not in exec form: {value}"
    # tini as PID 1 passes docker stop's SIGTERM on (PID 1 itself ignores signals it has no handler for)
    assert json.loads(instructions(path, "ENTRYPOINT")[0]) == ["tini", "--", "tablefree", "serve"]
    assert any(re.search(r"apt-get install .*\btini\b", run) for run in instructions(path, "RUN"))
    (healthcheck,) = instructions(path, "HEALTHCHECK")
    assert "--start-period" in healthcheck
    assert json.loads(healthcheck.split(" CMD ", 1)[1])[1:] == ["/opt/tablefree/docker/healthcheck.py"]
    assert "docker/healthcheck.py docker/" in instructions(path, "COPY")
    assert instructions(path, "EXPOSE") == ["8000"]
    assert [json.loads(v) for v in instructions(path, "VOLUME")] == [["/home/tablefree/.cache"]]
    env = " ".join(instructions(path, "ENV"))
    assert "TABLEFREE_PORT=8000" in env and "TABLEFREE_HOST=0.0.0.0" in env  # the health check's fallback
    assert {"BASE_IMAGE", "PIP_INDEX_URL", "EXTRA_CA_CERTS"} <= {a.split("=")[0] for a in instructions(path, "ARG")}
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()}
    for copy in instructions(path, "COPY") + instructions(path, "ADD"):
        *sources, _ = shlex.split(copy)
        for source in sources:
            assert (REPO / source).exists(), f"{path.name}: COPY source {source} is not in the repository"
            assert source.rstrip("/") not in ignored, f"{path.name}: COPY source {source} is in .dockerignore"


def test_cpu_image_and_ci_share_the_install_script():
    assert any("scripts/install.sh" in run for run in instructions(DOCKERFILES[1], "RUN"))
    assert "scripts/install.sh" in (REPO / ".ci" / "run").read_text()


def readme_docker_lines() -> list[str]:
    section = (REPO / "README.md").read_text().split("## Docker", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith(("docker ", "curl "))]


def test_readme_docker_lines_match_the_dockerfiles():
    lines = readme_docker_lines()
    builds = {re.search(r"-f (\S+)", l).group(1): re.search(r"-t (\S+)", l).group(1)
              for l in lines if l.startswith("docker build")}
    assert set(builds) == {"docker/Dockerfile", "docker/Dockerfile.cpu"}
    fields = set(ServerSettings.model_fields)
    for path in DOCKERFILES:
        tag = builds[str(path.relative_to(REPO))]
        runs = [l for l in lines if l.startswith("docker run") and f" {tag}" in l]
        demo, model = sorted(runs, key=lambda l: "TABLEFREE_MODEL=" in l)
        assert "TABLEFREE_MODEL" not in demo and ":/models/checkpoint:ro -e TABLEFREE_MODEL=/models/checkpoint" in model
        (volume,) = [json.loads(v)[0] for v in instructions(path, "VOLUME")]
        assert f"-v tablefree-cache:{volume} " in demo  # the demo checkpoint outlives the container
        (port,) = instructions(path, "EXPOSE")
        for run in runs:
            assert f"-p {port}:{port}" in run
            # a plain `docker stop` waits this long: the server's drain, then the engine's stop
            assert int(re.search(r"--stop-timeout (\d+) ", run).group(1)) >= DRAIN_S + 5
            gpu = path.name == "Dockerfile"
            assert ("--gpus all --ipc=host" in run) == gpu and ("--shm-size" in run) == (not gpu)
            assert gpu or "TABLEFREE_KV_CACHE_GB" in demo
            for var in re.findall(r"-e (TABLEFREE_\w+)=", run):
                assert var.removeprefix("TABLEFREE_").lower() in fields, var
    assert any(l.startswith("curl ") and ":8000/health" in l for l in lines)


def load_healthcheck():
    spec = importlib.util.spec_from_file_location("healthcheck", REPO / "docker" / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args,env,url",
    [
        ([], {}, "http://127.0.0.1:8000/health"),
        (["--port", "8503"], {}, "http://127.0.0.1:8503/health"),
        (["--served-model-name", "x", "--port=8503", "--dtype", "bfloat16"], {}, "http://127.0.0.1:8503/health"),
        (["/models/checkpoint", "--port", "8503"], {}, "http://127.0.0.1:8503/health"),  # serve's MODEL
        ([], {"TABLEFREE_PORT": "9000"}, "http://127.0.0.1:9000/health"),
        (["--port", "8503"], {"TABLEFREE_PORT": "9000"}, "http://127.0.0.1:8503/health"),  # flags win, as in serve
        (["--host", "::", "--port", "9"], {}, "http://[::1]:9/health"),
        (["--host", "10.1.2.3"], {}, "http://10.1.2.3:8000/health"),
        ([], {"TABLEFREE_HOST": "127.0.0.1"}, "http://127.0.0.1:8000/health"),
    ],
)
def test_healthcheck_follows_the_served_address(args, env, url):
    """PID 1's command line is the ENTRYPOINT plus what follows the image name in `docker run`."""
    served_url = load_healthcheck().served_url
    for path in DOCKERFILES:
        image_env = dict(pair.split("=", 1) for pair in " ".join(instructions(path, "ENV")).split() if "=" in pair)
        cmdline = json.loads(instructions(path, "ENTRYPOINT")[0]) + args
        assert served_url(cmdline, {**image_env, **env}) == url


def test_gpu_image_install_changes_no_package_of_the_vllm_image(tmp_path):
    """The GPU Dockerfile installs under constraints frozen from the base image. Without the image
    (no GPU here), vLLM 0.32.0's own resolution stands for it: pip --dry-run on package metadata."""
    (run,) = [r for r in instructions(DOCKERFILES[0], "RUN") if "pip install" in r]
    assert re.search(r"pip list --format=freeze > (\S+) .*pip install .*--constraint \1 \.", run), run

    def resolve(*args: str) -> dict[str, str]:
        report = tmp_path / "report.json"
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                               "--report", str(report), *args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}

    base = resolve("vllm==0.32.0")
    constraints = tmp_path / "base-image.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in base.items()))
    ours = resolve("--constraint", str(constraints), str(REPO))
    shared = ours.keys() & base.keys()
    assert {"tablefree", "transformers"} <= ours.keys()
    assert {name: ours[name] for name in shared} == {name: base[name] for name in shared}
