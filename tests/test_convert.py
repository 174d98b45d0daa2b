"""`tablefree inspect/convert/verify` on foreign checkpoints that ship their own remote code.

Four fixtures (tests/foreign) cover every option: code expansion, bit order, values and
scale; A and b in config.json, in state-dict buffers and computed from a seed; fused
Linear and Conv1D c_attn, separate q/k/v and GPT-NeoX's per-head fused q/k/v; every norm,
bias, GELU and rotary option; a learned-table source. Each is converted (which runs
verify, the vLLM engine against the fixture's own code) and its converted checkpoint is
checked against what the fixture was written with, and against the fixture's own
generate().
"""

import importlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from model_impl import TableFreeConfig, TokenCode, TokenCoder
from model_impl.codes import identity_affine
from model_impl.configuration_tablefree import CODE_FIELDS, MissingCodeLayoutError
from model_impl.convert.families import map_layout
from model_impl.convert.convert import is_plain_binary
from model_impl.convert.localise import compare_places, first_difference
from model_impl.convert.probe import InputMap, NotACode, fit_code
from model_impl.convert.source import load_remote_model, open_source
from server.cli import main
from vllm_plugin.parity import compare, greedy_reference

from .conftest import tablefree
from .foreign_checkpoints import load_foreign, random_affine, write_foreign
from .parity import generate_in_subprocess

A1, B1 = random_affine(11)  # gpt2_conv1d: in config.json
A2, B2 = random_affine(12)  # nanogpt_linear: state-dict buffers, LSB-first code
SEEDED = importlib.import_module("tests.foreign.llama_seeded")
A3, B3 = (t.tolist() for t in SEEDED.seeded_affine(1234))  # llama_seeded: computed by its code


def bits(rows):
    return ["".join(map(str, r)) for r in rows] if isinstance(rows[0], list) else "".join(map(str, rows))


def rope(factor, theta):
    return {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": factor}


# fixture -> (how it is written, what its converted config.json must say)
CASES = {
    "gpt2_conv1d": (
        dict(affine_A=A1, affine_b=B1),
        dict(code_matrix=bits(A1), code_shift=bits(B1), code_expansion="tile", code_bit_order="msb",
             code_values="binary", code_scale=1.0, norm_type="layernorm", norm_bias=True,
             hidden_act="gelu_pytorch_tanh", rope_style="gptj", rope_parameters=rope(0.5, 10000.0),
             attention_bias=True, attention_out_bias=True, mlp_bias=True, lm_head_bias=False,
             max_position_embeddings=256),
    ),
    "nanogpt_linear": (
        # LSB first: in this project's MSB convention the same map has A's columns reversed
        dict(buffers={"transformer.code_A": A2, "transformer.code_b": B2}),
        dict(code_matrix=bits([row[::-1] for row in A2]), code_shift=bits(B2), code_expansion="interleave",
             code_bit_order="msb", code_values="bipolar", code_scale=0.5, norm_type="rmsnorm", norm_bias=False,
             layer_norm_eps=1e-6, hidden_act="gelu", rope_style="neox", rope_parameters=rope(1.0, 500000.0),
             attention_bias=False, attention_out_bias=False, mlp_bias=False, lm_head_bias=False),
    ),
    "llama_seeded": (
        dict(code_seed=1234),
        dict(code_matrix=bits(A3), code_shift=bits(B3), code_expansion="tile", code_bit_order="msb",
             code_values="binary", code_scale=2.0, norm_type="layernorm", norm_bias=False,
             hidden_act="gelu_pytorch_tanh", rope_style="gptj", rope_parameters=rope(1.0, 1e6),
             attention_bias=True, attention_out_bias=False, mlp_bias=True, lm_head_bias=True),
    ),
    "neox_table": (
        {},
        dict(input_kind="table", norm_type="layernorm", norm_bias=True, hidden_act="gelu", rope_style="neox",
             rope_parameters=rope(0.25, 10000.0), attention_bias=True, attention_out_bias=True, mlp_bias=True,
             lm_head_bias=False),
    ),
}


@dataclass
class Converted:
    name: str
    src: Path
    dst: Path
    stdout: str
    stderr: str
    returncode: int
    report: dict | None


def convert(name: str, root: Path, **written) -> Converted:
    src = write_foreign(name, root / name, **written)  # its own directory name: remote code is cached by it
    dst = root / f"{name}-tablefree"
    run = tablefree("convert", str(src), str(dst), "--json", str(root / "verify.json"), check=False)
    report = json.loads((root / "verify.json").read_text()) if (root / "verify.json").exists() else None
    return Converted(name, src, dst, run.stdout, run.stderr, run.returncode, report)


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """name -> Converted, each fixture converted (and verified) once for the module."""
    pytest.importorskip("vllm")
    done: dict[str, Converted] = {}

    def get(name: str) -> Converted:
        if name not in done:
            done[name] = convert(name, tmp_path_factory.mktemp(name), **CASES[name][0])
        return done[name]

    return get


@pytest.fixture(params=CASES)
def converted(request, conversions) -> Converted:
    return conversions(request.param)


def test_convert_recovers_the_layout_and_verify_passes(converted):
    assert converted.returncode == 0, converted.stderr[-3000:] + converted.stdout[-3000:]
    assert "verify: PASS" in converted.stdout and converted.report["pass"]
    config = json.loads((converted.dst / "config.json").read_text())
    expected = CASES[converted.name][1]
    assert {k: config.get(k) for k in expected} == expected
    assert config["model_type"] == TableFreeConfig.model_type
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in converted.dst.iterdir()}
    table = config.get("input_kind") == "table"
    assert any(name.startswith("model.embed_tokens") for name in load_file(converted.dst / "model.safetensors")) == table
    assert not table or not set(CODE_FIELDS) & set(config)  # a table model's config holds no codes


def test_vllm_greedy_equals_the_fixtures_own_generate(converted):
    """The vLLM engine's outputs on DST (as verify recorded them) against the fixture's own generate(),
    with the fixture loaded by its own classes here."""
    prompts = converted.report["prompts"]
    model = load_foreign(converted.name, converted.src)
    refs = greedy_reference(model, [p["prompt"] for p in prompts], len(prompts[0]["vllm_tokens"]))
    got = [(p["vllm_tokens"], [{int(t): lp for t, lp in step.items()} for step in p["vllm_top_logprobs"]])
           for p in prompts]
    report = compare(refs, got)
    assert not report.failures and report.tokens_compared >= len(prompts) * 12, report
    print(f"{converted.name}: {report.tokens_compared} tokens, max logprob diff {report.max_logprob_diff:.1e}")


def corrupt_block(dst: Path, out: Path, block: int) -> Path:
    shutil.copytree(dst, out)
    tensors = load_file(out / "model.safetensors")
    tensors[f"model.layers.{block}.mlp.down_proj.weight"] *= 1.5
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_codes_of_a_converted_checkpoint_are_the_fixtures_own(conversions, capsys):
    """nanogpt_linear reads LSB-first bits, A and b from its buffers, {-0.5, 0.5}, each bit 4 times in a row."""
    case = conversions("nanogpt_linear")
    assert main(["codes", "hi there", "--model", str(case.dst), "--values", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("layout: interleave, msb first, bipolar x 0.5, width 64")
    A, b = torch.tensor(A2), torch.tensor(B2)
    for line in lines[2:]:
        fields = line.split()  # token (its repr may hold spaces), id, bin_16, A c xor b, 16 values
        token_id, plain, recoded, values = *fields[-19:-16], fields[-16:]
        t = int(token_id)
        assert plain == format(t, "016b")  # bin_16 in the converted layout's MSB order
        c = torch.tensor([(t >> j) & 1 for j in range(16)])  # the fixture's LSB-first bits
        expected = (A @ c + b) % 2
        assert recoded == "".join(map(str, expected.tolist()))
        assert [float(v) for v in values] == ((expected.float() - 0.5)).repeat_interleave(4)[:16].tolist()
    assert len(lines) > 3


def test_codes_default_layout_from_the_console_script():
    run = tablefree("codes", "hello the test")
    config = TableFreeConfig()
    row = next(line.split() for line in run.stdout.splitlines() if line.startswith("'o'"))
    c = [int(ch) for ch in format(111, "016b")]  # 'o' is id 111 in the author's tokenizer family
    recoded = [(sum(int(a) & x for a, x in zip(r, c)) + int(s)) % 2 for r, s in zip(config.code_matrix, config.code_shift)]
    assert row[1:4] == ["111", "".join(map(str, c)), "".join(map(str, recoded))]
    assert row[4:] == [str(v) for v in recoded]  # tiled {0, 1}: the first 16 values are the recoded bits


def test_verify_fails_on_a_wrong_block_and_names_it(conversions, tmp_path):
    case = conversions("llama_seeded")
    broken = corrupt_block(case.dst, tmp_path / "broken", 1)
    run = tablefree("verify", str(broken), "--reference", str(case.src), check=False)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "verify: FAIL" in run.stdout and "DIFFERS" in run.stdout
    assert "first difference at block 1 output (model.layers.1 / model.layers.1)" in run.stdout


def test_localisation_names_the_input_codes_when_b_is_wrong(conversions, tmp_path):
    case = conversions("llama_seeded")
    dst = shutil.copytree(case.dst, tmp_path / "wrong_b")
    config = json.loads((dst / "config.json").read_text())
    config["code_shift"] = ("1" if config["code_shift"][0] == "0" else "0") + config["code_shift"][1:]
    (dst / "config.json").write_text(json.dumps(config))
    source = open_source(str(case.src))
    ours = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    places = compare_places(load_remote_model(source), map_layout(source.tensors), ours, torch.tensor([[5, 6, 7]]))
    assert first_difference(places).name == "input codes"


# --- probing the input map (no engine) ---------------------------------------------------------------------


def all_inputs(code: TokenCode) -> torch.Tensor:
    return TokenCoder(code)(torch.arange(1 << 16), torch.float32)


@pytest.mark.parametrize("expansion,bit_order,values,scale", [
    ("tile", "msb", "binary", 1.0), ("tile", "lsb", "bipolar", 0.25), ("interleave", "msb", "bipolar", 3.0),
    ("interleave", "lsb", "binary", 0.5),
])
def test_probing_recovers_any_affine_code(expansion, bit_order, values, scale):
    matrix, shift = random_affine(21)
    code = TokenCode(tuple(map(tuple, matrix)), tuple(shift), 64, expansion, bit_order, values, scale)
    found = fit_code(all_inputs(code))
    assert (found.expansion, found.values, found.scale) == (expansion, values, scale)
    assert torch.equal(all_inputs(found), all_inputs(code))
    if bit_order == "msb":  # the project's convention: the very same A
        assert found.matrix == code.matrix and found.shift == code.shift


def test_probing_reads_a_plain_binary_code_as_the_identity_in_its_bit_order():
    matrix, shift = identity_affine()
    code = TokenCode(tuple(map(tuple, matrix)), tuple(shift), 64, "tile", "lsb", "binary", 1.0)
    found = fit_code(all_inputs(code))
    assert found.bit_order == "lsb" and found.matrix == code.matrix and not any(found.shift)
    assert is_plain_binary(InputMap(found, None, ""))  # written as the plain-binary sibling's model_type


def not_codes() -> dict[str, torch.Tensor]:
    matrix, shift = random_affine(22)
    code = TokenCode(tuple(map(tuple, matrix)), tuple(shift), 64, "tile", "msb", "binary", 1.0)
    three = all_inputs(code)
    three[1, 3] = 0.5  # id 1 = 2^0 is always probed
    shuffled = all_inputs(code)[:, torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    nonlinear = all_inputs(code)
    ids = torch.arange(1 << 16)
    nonlinear[:, 0::16] = (nonlinear[:, :1].long() ^ ((ids >> 3) & (ids >> 5) & 1)[:, None]).float()
    offset = all_inputs(code) + 0.25
    return {
        "3 distinct values enter the first block": three,
        "not 16 bits tiled or interleaved": shuffled,
        "an affine fit from ids 0 and 2^j disagrees with id": nonlinear,
        "are neither {0, s} nor {-s, s}": offset,
        "the vocabulary has 1000 ids": all_inputs(code)[:1000],
    }


@pytest.mark.parametrize("reason", not_codes())
def test_probing_names_why_an_input_is_not_an_affine_code(reason):
    with pytest.raises(NotACode, match=re.escape(reason)):
        fit_code(not_codes()[reason])


# --- inspect ------------------------------------------------------------------------------------------------


def test_inspect_says_our_checkpoint_is_servable_as_is(tiny_checkpoint):
    run = tablefree("inspect", str(tiny_checkpoint), check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "servable as is: yes" in run.stdout and "parameters: " in run.stdout


@pytest.mark.parametrize(
    "name,written,expected",
    [
        ("gpt2_conv1d", dict(affine_A=A1, affine_b=B1),
         ["model_type: model_binary_affine_code_n_layer_32 (this project registers this type)",
          "tensor family: gpt2 (fused attn.c_attn, Conv1D (transposed)), 2 layers, width 64",
          "code layout in config.json fields affine_A (16 x 16 bits), affine_b (16 bits)",
          "heads: 2 (config.json n_head)", "servable as is: no (config.json has this project's model_type but not"
          " its code fields (code_matrix, code_shift, code_expansion, code_bit_order, code_values, code_scale))"]),
        ("nanogpt_linear", dict(buffers={"transformer.code_A": A2, "transformer.code_b": B2}),
         ["tensor family: gpt2 (fused attn.c_attn), 2 layers",
          "code layout in state-dict tensors transformer.code_A (16, 16), transformer.code_b (16,)",
          "norm (LayerNorm without bias or RMSNorm)", "servable as is: no (model_type 'nanogpt_bipolar_codes'"]),
        ("llama_seeded", dict(code_seed=None),
         ["tensor family: llama (separate q/k/v)", "code layout in the remote code only"]),
        ("neox_table", {},
         ["tensor family: gpt-neox (fused attention.query_key_value)",
          "input: a 65536 x 64 tensor gpt_neox.embed_in.weight: a learned table"]),
    ],
)
def test_inspect_reports_what_convert_needs_from_headers_only(tmp_path, capsys, name, written, expected):
    src = write_foreign(name, tmp_path / name, **written)
    (src / "model.safetensors").rename(src / "weights.safetensors")  # headers are read from any *.safetensors
    assert main(["inspect", str(src)]) == 1
    out = capsys.readouterr().out
    for line in expected:
        assert line in out, out


def test_a_hub_id_that_cannot_be_fetched_is_a_clear_error(capsys):
    """HF_HUB_OFFLINE=1 here (conftest): the published checkpoint's id names why it cannot be read."""
    assert main(["inspect", "Bochkov/llm-fix-min-affine-recoded-minimal-code-table-free"]) == 2
    assert "is not a local directory and could not be fetched from the hub" in capsys.readouterr().out


def test_inspect_and_convert_ask_for_the_head_count_when_config_lacks_it(tmp_path, capsys):
    src = write_foreign("nanogpt_linear", tmp_path / "nanogpt_linear", buffers={"transformer.code_A": A2,
                                                                                "transformer.code_b": B2})
    config = json.loads((src / "config.json").read_text())
    del config["n_heads"]
    (src / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(src)]) == 1
    out = capsys.readouterr().out
    assert "heads: not in config.json" in out and f"run: tablefree convert {src} DST --num-heads" in out
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 2
    assert "number of attention heads is not in config.json" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


# --- refusals: each names the cause and writes nothing ------------------------------------------------------


def test_a_non_affine_input_is_refused(tmp_path, capsys):
    src = write_foreign("llama_seeded", tmp_path / "llama_nonlinear", code_kind="nonlinear")
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert "SRC's input is not an affine 16-bit code (an affine fit from ids 0 and 2^j disagrees with id" in err
    assert "SRC holds no input table" in err
    assert not (tmp_path / "dst").exists()


def test_an_unknown_tensor_family_is_refused(tmp_path, capsys):
    src = write_foreign("llama_seeded", tmp_path / "llama_renamed", code_seed=1234)
    tensors = load_file(src / "model.safetensors")
    renamed = {k.replace("model.layers.", "backbone.blocks."): v for k, v in tensors.items()}
    save_file(renamed, src / "model.safetensors", metadata={"format": "pt"})
    assert main(["inspect", str(src)]) == 2
    assert "unknown tensor family: no known layout matches" in capsys.readouterr().out
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 2
    assert "unknown tensor family: no known layout matches (backbone.blocks.0." in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


@pytest.fixture(scope="module")
def our_type_without_code_fields(tmp_path_factory) -> Path:
    """Like the published checkpoint: this project's model_type, its own field names and remote code."""
    return write_foreign("gpt2_conv1d", tmp_path_factory.mktemp("ours") / "gpt2_conv1d", affine_A=A1, affine_b=B1)


def test_model_impl_refuses_our_model_type_without_code_fields(our_type_without_code_fields):
    for load in (lambda p: AutoModelForCausalLM.from_pretrained(p), lambda p: AutoConfig.from_pretrained(p),
                 lambda p: AutoConfig.from_pretrained(p, trust_remote_code=True)):
        with pytest.raises(MissingCodeLayoutError) as info:
            load(our_type_without_code_fields)
        message = str(info.value)
        assert "lacks this project's code fields (code_matrix, code_shift" in message
        assert "tablefree inspect" in message and "tablefree convert" in message


def test_programmatic_configs_keep_their_defaults_and_saved_ones_carry_the_code_fields(tiny_checkpoint):
    assert TableFreeConfig().code_expansion == "tile"
    assert TableFreeConfig.from_dict(TableFreeConfig().to_dict()).code_matrix == TableFreeConfig().code_matrix
    assert set(CODE_FIELDS) <= set(json.loads((tiny_checkpoint / "config.json").read_text()))


def test_the_plugin_refuses_our_model_type_without_code_fields(our_type_without_code_fields):
    pytest.importorskip("vllm")
    with pytest.raises(RuntimeError) as info:
        generate_in_subprocess(our_type_without_code_fields, [[1, 2, 3]], max_model_len=256)
    assert "lacks this project's code fields" in str(info.value) and "tablefree convert" in str(info.value)


def test_convert_refuses_a_source_without_remote_code(our_type_without_code_fields, tmp_path, capsys):
    src = tmp_path / "no_code"
    shutil.copytree(our_type_without_code_fields, src)
    config = json.loads((src / "config.json").read_text())
    del config["auto_map"]
    (src / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 2
    assert "config.json has no auto_map entry for AutoConfig, AutoModelForCausalLM" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


# --- the README shows what the commands print --------------------------------------------------------------


def normalised(text: str) -> list[str]:
    """Lines with paths and measured differences blanked: the rest must be as the README shows."""
    text = re.sub(r"\d\.\de[-+]\d\d", "D", text)
    return [re.sub(r"(/[\w.-]+)+", "PATH", line).rstrip() for line in text.splitlines() if line.strip()]


def readme_block(after: str) -> list[str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return normalised(re.search(re.escape(after) + r".*?```\n(.*?)```", readme, re.S).group(1))


def test_readme_shows_what_inspect_convert_verify_and_codes_print(conversions, tmp_path, capsys):
    src = write_foreign("gpt2_conv1d", tmp_path / "gpt2_conv1d", affine_A=A1, affine_b=B1)
    assert main(["inspect", str(src)]) == 1
    assert normalised(capsys.readouterr().out) == readme_block("(a test fixture, tiny):")
    printed = normalised(conversions("gpt2_conv1d").stdout)
    for block in ("and runs `verify`:", "exits 0 if everything agrees, 1 if not:"):
        assert all(line in printed for line in readme_block(block)), readme_block(block)
    assert main(["codes", "hello the test"]) == 0
    assert readme_block("the default layout and the demo tokenizer):") == normalised(capsys.readouterr().out)[:5]
    assert "tablefree inspect SRC\ntablefree convert SRC DST\ntablefree verify DST --reference SRC" in (
        Path(__file__).resolve().parents[1] / "README.md").read_text()


# --- the card's shape ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_card_shaped_foreign_checkpoint_converts_and_verifies(tmp_path):
    """32 layers, width 1024, 32 heads, context 1024, bf16 weights, the published checkpoint's likely layout."""
    case_written = dict(affine_A=A1, affine_b=B1, n_embd=1024, n_layer=32, n_head=32, n_positions=1024)
    src = write_foreign("gpt2_conv1d", tmp_path / "gpt2_conv1d_card", dtype=torch.bfloat16, **case_written)
    dst = tmp_path / "card-tablefree"
    run = tablefree("convert", str(src), str(dst), "--new-tokens", "8", check=False)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    assert "verify: PASS" in run.stdout
    config = json.loads((dst / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["dtype"]) == (32, 1024, "bfloat16")
    print(run.stdout[-1500:])
