"""The Dockerfiles, checked without a Docker engine: hadolint, structure, README consistency."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

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
    assert json.loads(instructions(path, "ENTRYPOINT")[0]) == ["tablefree", "serve"]
    (healthcheck,) = instructions(path, "HEALTHCHECK")
    assert "--start-period" in healthcheck and "/health" in healthcheck
    assert instructions(path, "EXPOSE") == ["8000"]
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
    runs = {tag: next(l for l in lines if l.startswith("docker run") and f" {tag}" in l) for tag in builds.values()}
    gpu, cpu = runs[builds["docker/Dockerfile"]], runs[builds["docker/Dockerfile.cpu"]]
    assert "--gpus all" in gpu and "--gpus" not in cpu
    assert "--shm-size" in cpu and "TABLEFREE_KV_CACHE_GB" in cpu
    fields = set(ServerSettings.model_fields)
    for path, run in ((DOCKERFILES[0], gpu), (DOCKERFILES[1], cpu)):
        (port,) = instructions(path, "EXPOSE")
        assert f"-p {port}:{port}" in run
        (volume,) = [json.loads(v)[0] for v in instructions(path, "VOLUME")]
        assert f":{volume}" in run
        for var in re.findall(r"-e (TABLEFREE_\w+)=", run):
            assert var.removeprefix("TABLEFREE_").lower() in fields, var
    assert any(l.startswith("curl ") and ":8000/health" in l for l in lines)
