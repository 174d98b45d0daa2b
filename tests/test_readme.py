"""The README's main-job command, curl line and openai SDK example work as written."""

import json
import os
import re
import subprocess
import sys

import pytest

from server.engine import DEMO_NAME

from .conftest import REPO
from .live_server import free_port, live_server

pytest.importorskip("vllm")
README = (REPO / "README.md").read_text()


def block_after(heading_text: str, lang: str = "") -> str:
    match = re.search(re.escape(heading_text) + r".*?```" + lang + r"\n(.*?)```", README, re.S)
    return match.group(1)


@pytest.mark.slow
def test_main_job_serves_the_demo_and_the_readme_examples_work(tmp_path):
    main_job = block_after("Set up and run the main job").strip()
    setup, _, command = main_job.partition(" && ")
    assert setup == "bash scripts/install.sh"
    port = free_port()
    env = {"TABLEFREE_PORT": str(port), "TABLEFREE_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf")}
    with live_server(command.split(), port, env=env, cwd=REPO, timeout=600) as base:
        models = json.loads(subprocess.check_output(["curl", "-s", f"{base}/v1/models"]))["data"]
        assert models[0]["id"] == DEMO_NAME and "random weights" in models[0]["note"]
        curl = block_after("With the server running:").strip().replace("8000", str(port))
        completion = json.loads(subprocess.check_output(curl, shell=True))
        assert completion["object"] == "text_completion" and completion["model"] == DEMO_NAME
        assert completion["usage"]["completion_tokens"] >= 1
        sdk = block_after("With the server running:", "python").replace("8000", str(port))
        run = subprocess.run([sys.executable, "-c", sdk], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert run.returncode == 0, run.stderr
