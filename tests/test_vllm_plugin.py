"""The vLLM plugin against model_impl: greedy tokens and logprobs, cache modes, TP, loading."""

import shutil
import sys

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from model_impl.checkpoint import make_checkpoint, make_config

from .conftest import tablefree
from .live_server import free_port, live_server, ray_head
from .parity import (
    NEW_TOKENS, EngineFailed, completions, compare, engine_settings, generate_in_subprocess, greedy_params,
    mixed_prompts, run_in_subprocess, transformers_greedy,
)

vllm = pytest.importorskip("vllm")
from vllm import LLM, SamplingParams  # noqa: E402


def greedy(llm: LLM, prompts: list[list[int]]):
    return completions(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy_params(), use_tqdm=False))


def assert_parity(report) -> None:
    assert not report.failures, report.failures
    assert report.tokens_compared >= report.sequences * NEW_TOKENS // 2
    print(
        f"parity: {report.sequences} sequences, {report.tokens_compared} tokens compared, "
        f"{report.near_ties} near-ties, max logprob diff {report.max_logprob_diff:.2e}"
    )


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> LLM:
    """The one in-process engine of the test session (default settings: prefix caching on)."""
    return LLM(**engine_settings(tiny_checkpoint))


@pytest.fixture(scope="module")
def prompts(engine):
    return mixed_prompts(engine.get_tokenizer())


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, prompts):
    return transformers_greedy(tiny_checkpoint, prompts, NEW_TOKENS)


def test_batched_greedy_matches_transformers_with_prefix_caching(engine, prompts, reference):
    assert engine.llm_engine.vllm_config.cache_config.enable_prefix_caching
    first = greedy(engine, prompts)
    assert_parity(compare(reference, first))
    again = engine.generate([{"prompt_token_ids": p} for p in prompts], greedy_params(), use_tqdm=False)
    assert sum(out.num_cached_tokens or 0 for out in again) > 0  # the same prompts hit the prefix cache
    assert_parity(compare(reference, completions(again)))


@pytest.mark.parametrize(
    "engine_settings",
    [{"enable_prefix_caching": False}, {"max_num_batched_tokens": 32, "max_num_seqs": 8, "enable_chunked_prefill": True}],
    ids=["no-prefix-caching", "chunked-prefill-32"],  # prompts of up to 250 tokens go in chunks of <= 32
)
def test_greedy_matches_without_prefix_caching_and_with_chunked_prefill(
    tiny_checkpoint, prompts, reference, engine_settings
):
    assert_parity(compare(reference, generate_in_subprocess(tiny_checkpoint, prompts, **engine_settings)))


def test_plain_binary_sibling_with_another_code_layout_matches(tmp_path, prompts):
    """The other model type, interleaved {-1,+1} LSB-first codes, bf16 weights in shards, read by vLLM as fp32."""
    checkpoint = tmp_path / "binary"
    tablefree(
        "make-checkpoint", str(checkpoint), "--preset", "tiny", "--variant", "binary", "--code-expansion", "interleave",
        "--code-bit-order", "lsb", "--code-values", "bipolar", "--code-scale", "0.5", "--dtype", "bfloat16",
        "--max-shard-size", "4MB",
    )
    got = generate_in_subprocess(checkpoint, prompts[:4])
    assert_parity(compare(transformers_greedy(checkpoint, prompts[:4], NEW_TOKENS), got))


# The structural options beyond the defaults (LayerNorm with bias, exact GELU, full NeoX rotary
# at 10000, codes), grouped so that two checkpoints cover every one of them.
STRUCTURE_OPTIONS = {
    "rmsnorm-tanh-gptj-half-qkv-bias": dict(
        norm_type="rmsnorm", hidden_act="gelu_pytorch_tanh", rope_style="gptj",
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
        attention_bias=True, attention_out_bias=False, mlp_bias=False, lm_head_bias=False,
    ),
    "table-layernorm-no-bias-neox-quarter": dict(
        input_kind="table", norm_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25},
    ),
}


@pytest.mark.parametrize("options", STRUCTURE_OPTIONS.values(), ids=STRUCTURE_OPTIONS.keys())
def test_structure_options_match(tmp_path, prompts, options):
    checkpoint = tmp_path / "options"
    make_checkpoint(checkpoint, make_config("tiny", **options), seed=5)
    got = generate_in_subprocess(checkpoint, prompts)
    assert_parity(compare(transformers_greedy(checkpoint, prompts, NEW_TOKENS), got))


def test_seeded_sampling_repeats_and_seeds_matter(engine, prompts):
    def sample(seed):
        params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=seed, ignore_eos=True)
        return [o.outputs[0].token_ids for o in engine.generate([{"prompt_token_ids": p} for p in prompts], params)]

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_loaded_model_has_no_input_table(engine):
    def tensors(model):
        named = [*model.named_parameters(), *model.named_buffers()]
        return [(name, tuple(t.shape), t.numel()) for name, t in named]

    (found,) = engine.apply_model(tensors)
    vocab, width = 65536, 64
    big = {name for name, shape, numel in found if vocab in shape or numel >= vocab * width}
    assert big <= {"lm_head.weight", "lm_head.bias"}
    codes = [(name, numel) for name, _, numel in found if name.startswith("model.codes")]
    assert sorted(codes) == [("model.codes.masks", 16), ("model.codes.shift", 16)]


def corrupt(checkpoint, tmp_path, edit) -> str:
    """A copy of the checkpoint whose tensors went through `edit`."""
    out = tmp_path / "broken"
    shutil.copytree(checkpoint, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.__setitem__("model.layers.1.mlp.upp_proj.bias", t.pop("model.layers.1.mlp.up_proj.bias")),
         "unexpected tensor model.layers.1.mlp.upp_proj.bias"),
        (lambda t: t.pop("model.norm.bias"), "missing tensor model.norm.bias (64,)"),
        (lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(64, 32)),
         "model.layers.0.self_attn.k_proj.weight has shape (64, 32), expected (64, 64)"),
    ],
    ids=["renamed", "missing", "misshaped"],
)
def test_broken_checkpoints_fail_naming_the_tensor(tiny_checkpoint, tmp_path, edit, message):
    broken = corrupt(tiny_checkpoint, tmp_path, edit)
    with pytest.raises(RuntimeError, match="checkpoint does not match the table-free layout") as info:
        generate_in_subprocess(broken, [[1, 2, 3]])
    assert message in str(info.value)


# Two ranks on this CPU: worker processes, one core per rank.
TWO_RANKS = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


def assert_same_tokens(got, engine, prompts) -> None:
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in greedy(engine, prompts)]


def test_tensor_parallel_2_gives_the_tp1_tokens(tiny_checkpoint, engine, prompts, reference):
    run = run_in_subprocess(tiny_checkpoint, prompts, TWO_RANKS, tensor_parallel_size=2)
    assert (run.facts["tensor_parallel_size"], run.facts["distributed_executor_backend"]) == (2, "mp")
    assert run.facts["compiled"] == [False, False]  # two eager workers
    assert_parity(compare(reference, run.completions))
    assert_same_tokens(run.completions, engine, prompts)


def test_compiled_path_matches_transformers(tiny_checkpoint, engine, prompts, reference, tmp_path):
    """enforce_eager=False, vLLM's default on GPUs: on CPU, Dynamo traces TableFreeModel once and
    Inductor compiles it. A compile cache of its own, so the test compiles as a fresh machine does."""
    run = run_in_subprocess(tiny_checkpoint, prompts, {"VLLM_CACHE_ROOT": str(tmp_path)}, enforce_eager=False)
    assert (run.facts["compilation_mode"], run.facts["compile_backend"]) == ("DYNAMO_TRACE_ONCE", "inductor")
    assert run.facts["compiled"] == [True]
    assert_parity(compare(reference, run.completions))
    assert_same_tokens(run.completions, engine, prompts)


def test_pipeline_parallel_2_gives_the_single_process_tokens(tiny_checkpoint, engine, prompts, reference, tmp_path):
    """PP=2 on this CPU runs on the compiled path only (the eager refusal is the next test)."""
    env = {**TWO_RANKS, "VLLM_CACHE_ROOT": str(tmp_path)}
    run = run_in_subprocess(tiny_checkpoint, prompts, env, pipeline_parallel_size=2, enforce_eager=False)
    assert (run.facts["pipeline_parallel_size"], run.facts["distributed_executor_backend"]) == (2, "mp")
    assert run.facts["compiled"] == [True, True]
    assert_parity(compare(reference, run.completions))
    assert_same_tokens(run.completions, engine, prompts)


def test_pipeline_parallel_eager_fails_in_vllms_cpu_runner(tiny_checkpoint):
    """vLLM 0.32's CPU runner allocates the buffer for hidden states received from the previous
    stage only in its warm-up, which it skips when eager: the last stage fails its first step.
    vLLM's in-tree GPT-2 fails the same way, so this documents vLLM, not the plugin."""
    with pytest.raises(EngineFailed) as info:
        generate_in_subprocess(tiny_checkpoint, [[1, 2, 3]], TWO_RANKS, pipeline_parallel_size=2)
    assert "in sync_and_gather_intermediate_tensors" in info.value.output
    assert "assert self.intermediate_tensors is not None" in info.value.output


def test_ray_executor_is_refused_by_vllms_cpu_platform(tiny_checkpoint):
    """TP=2 with the Ray backend, on a local Ray cluster: vLLM joins it, then refuses, because its
    CPU platform names no Ray resource for a worker (`ray_device_key` is empty)."""
    pytest.importorskip("ray")
    with ray_head() as ray_env, pytest.raises(EngineFailed) as info:
        generate_in_subprocess(tiny_checkpoint, [[1, 2, 3]], {**TWO_RANKS, **ray_env}, tensor_parallel_size=2,
                               distributed_executor_backend="ray")
    assert "Connected to Ray cluster" in info.value.output
    assert "ValueError: current platform cpu does not support ray." in info.value.output


def test_vllm_openai_server_serves_the_checkpoint(tiny_checkpoint, engine):
    """vLLM's own server, with nothing but this project installed (the plugin entry point)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_checkpoint),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
        "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20),
    ]
    prompt = "Question: What is the capital of UK?\nAnswer:"
    with live_server(cmd, port) as base:
        body = {"model": str(tiny_checkpoint), "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    offline = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert response.json()["choices"][0]["text"] == offline[0].outputs[0].text


@pytest.mark.slow
def test_card_shaped_checkpoint_matches_transformers(tmp_path_factory):
    from transformers import AutoTokenizer

    """The card's shape (~470M parameters, random weights): about a minute."""
    checkpoint = tmp_path_factory.mktemp("card") / "card"
    tablefree("make-checkpoint", str(checkpoint), "--preset", "card", "--seed", "2")
    prompts = mixed_prompts(AutoTokenizer.from_pretrained(checkpoint))
    got = generate_in_subprocess(checkpoint, prompts, kv_cache_memory_bytes=1 << 30)
    assert_parity(compare(transformers_greedy(checkpoint, prompts, NEW_TOKENS), got))
