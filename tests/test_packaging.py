"""The distribution: it builds with the oldest setuptools it allows, and once installed its
top-level packages (`server`, `vllm_plugin`, `model_impl`) are its own and nobody else's.
"""

import json
import subprocess
import sys
import sysconfig
import tomllib
import venv

import pytest
from packaging.requirements import Requirement

from .conftest import REPO

PACKAGES = ("server", "vllm_plugin", "model_impl")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The project's wheel, built in pip's isolated build env with the oldest setuptools major allowed."""
    (setuptools,) = [Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
                     if Requirement(r).name == "setuptools"]
    (floor,) = [s.version for s in setuptools.specifier if s.operator == ">="]
    out = tmp_path_factory.mktemp("wheel")
    constraint = out / "build-constraints.txt"
    constraint.write_text(f"setuptools~={floor.split('.')[0]}.0\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--build-constraint",
                           str(constraint), "--wheel-dir", str(out), str(REPO)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (built,) = out.glob("tablefree-*.whl")
    return built


def test_installed_packages_resolve_to_the_distribution_and_no_other_provides_them(wheel, tmp_path):
    """A fresh venv holding only the wheel; its dependencies come from the test venv's site-packages,
    added as a plain path, so the test venv's editable install of this project stays out of it."""
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True, capture_output=True, timeout=120)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (env / site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    probe = f"""
import importlib, importlib.metadata as md, json, pathlib
own = md.distribution("tablefree")
files = {{pathlib.Path(own.locate_file(f)).resolve() for f in own.files}}
providers = {{name: sorted({{d.metadata["Name"] for d in md.distributions()
                            if any(pathlib.PurePath(f).parts[0] in (name, name + ".py") for f in d.files or ())}})
             for name in {PACKAGES!r}}}
print(json.dumps({{"own": str(own._path), "providers": providers,
                  "resolved": {{name: pathlib.Path(importlib.import_module(name).__file__).resolve() in files
                               for name in {PACKAGES!r}}}}}))
"""
    proc = subprocess.run([str(python), "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    assert found["own"].startswith(str(env))
    assert found["resolved"] == {name: True for name in PACKAGES}
    assert found["providers"] == {name: ["tablefree"] for name in PACKAGES}
