"""The engine surface of `tablefree serve`: vLLM's own engine flags, device-dependent defaults,
the checkpoint's generation defaults, vLLM's metrics, and the HTTP options vLLM's server has
(CORS, request ids, aliases, TLS, a chat template).

The module's server runs over HTTPS with a self-signed certificate, as `--ssl-*` users do.
"""

import argparse
import json
import shutil
import ssl
import subprocess
import sys

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from .conftest import KEY, PROMPT, REPO, auth, serve_cmd
from .live_server import free_port, live_server

pytest.importorskip("vllm")
from server.engine import add_engine_flags, device_defaults, engine_args  # noqa: E402
from server.settings import ServerSettings, add_server_flags, settings_from  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

TEMPLATE = REPO / "tests" / "data" / "chat_template.jinja"
ORIGIN = "http://example.com"


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return str(key), str(cert)


@pytest.fixture(scope="module")
def tuned_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint whose generation_config.json asks for top_k 1 (greedy whatever the temperature)."""
    out = tmp_path_factory.mktemp("tuned") / "tuned"
    shutil.copytree(tiny_checkpoint, out)
    config = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**config, "top_k": 1, "temperature": 0.7}))
    return out


@pytest.fixture(scope="module")
def engine_server(tuned_checkpoint, tls):
    port = free_port()
    cmd = serve_cmd(tuned_checkpoint, port, "--api-key", KEY, "--served-model-name", "tiny", "tiny-alias",
                    "--max-num-seqs", "4", "--enable-prefix-caching", "--seed", "1", "--chat-template", str(TEMPLATE),
                    "--allowed-origins", json.dumps([ORIGIN]), "--ssl-keyfile", tls[0], "--ssl-certfile", tls[1])
    with live_server(cmd, port, scheme="https", verify=trusting(tls[1])) as base:
        yield base


@pytest.fixture(scope="module")
def https(engine_server, tls) -> httpx.Client:
    with httpx.Client(base_url=engine_server, verify=trusting(tls[1]), timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(engine_server, tls) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{engine_server}/v1", api_key=KEY, max_retries=0,
                         http_client=httpx.Client(verify=trusting(tls[1]), timeout=120))


def trusting(cert: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert)


def parse(*argv: str) -> argparse.Namespace:
    parser = FlexibleArgumentParser()
    parser.add_argument("model_tag", nargs="?")
    add_server_flags(parser)
    add_engine_flags(parser)
    return parser.parse_args(argv)


def test_help_lists_vllms_engine_options_and_the_servers():
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ["--gpu-memory-utilization", "--max-num-seqs", "--max-num-batched-tokens", "--enable-prefix-caching",
                 "--kv-cache-dtype", "--pipeline-parallel-size", "--tensor-parallel-size", "--data-parallel-size",
                 "--distributed-executor-backend", "--compilation-config", "--generation-config", "--quantization",
                 "--seed", "--enforce-eager", "--served-model-name", "--shutdown-timeout", "--api-key",
                 "--max-concurrent-requests", "--chat-template", "--allowed-origins", "--ssl-keyfile", "--root-path",
                 "--uvicorn-log-level", "--kv-cache-gb"]:
        assert flag in proc.stdout, flag


class Platform:
    """vLLM's `current_platform`, as the device it reports (no GPU is lent here to run the other branch)."""

    def __init__(self, cpu: bool) -> None:
        self.cpu = cpu

    def is_cpu(self) -> bool:
        return self.cpu


@pytest.mark.parametrize("cpu", [True, False], ids=["cpu", "gpu"])
def test_device_defaults_eager_and_an_explicit_kv_cache_on_cpu_only(cpu, tiny_checkpoint):
    from vllm.platforms import current_platform

    assert current_platform.is_cpu()  # this machine: the CPU branch is the real platform
    engine, _ = engine_args(parse(str(tiny_checkpoint)), ServerSettings(), current_platform if cpu else Platform(cpu))
    if cpu:
        assert engine.enforce_eager is True and engine.kv_cache_memory_bytes == 1 << 30
    else:  # vLLM's own defaults: compiled with CUDA graphs, the KV cache from --gpu-memory-utilization
        assert engine.enforce_eager is False and engine.kv_cache_memory_bytes is None
        assert engine.gpu_memory_utilization == 0.92
    # what the user says always wins
    given = parse(str(tiny_checkpoint), "--no-enforce-eager", "--kv-cache-memory-bytes", "2G")
    assert device_defaults(Platform(cpu), given, ServerSettings()) == {}


def test_flags_win_over_environment_which_wins_over_defaults(monkeypatch):
    monkeypatch.setenv("TABLEFREE_PORT", "9001")
    monkeypatch.setenv("TABLEFREE_MAX_CONCURRENT_REQUESTS", "7")
    settings = settings_from(parse("--port", "9002", "--strict-fields"))
    assert (settings.port, settings.max_concurrent_requests, settings.strict_fields, settings.send_timeout) == (
        9002, 7, True, 60.0)


def test_the_engine_runs_with_the_flags_given(https):
    info = https.get("/server_info", headers=auth()).json()
    assert (info["max_num_seqs"], info["enable_prefix_caching"], info["seed"]) == (4, True, 1)
    assert info["served_model_names"] == ["tiny", "tiny-alias"] and info["enforce_eager"] is True
    assert info["generation_defaults"] == {"top_k": 1, "temperature": 0.7}


def test_the_checkpoints_generation_config_is_the_default_and_requests_win(client):
    def texts(**kwargs) -> set[str]:
        return {client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, seed=seed, **kwargs).choices[0]
                .text for seed in (1, 2, 3)}

    greedy = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    assert texts() == {greedy}  # top_k 1 from generation_config.json
    assert len(texts(extra_body={"top_k": 0}, temperature=1.0)) > 1  # the request's own values win


def test_aliases_and_request_ids(https):
    names = [m["id"] for m in https.get("/v1/models", headers=auth()).json()["data"]]
    assert names == ["tiny", "tiny-alias"]
    response = https.post("/v1/completions", json={"model": "tiny-alias", "prompt": "x", "max_tokens": 2},
                          headers={**auth(), "X-Request-Id": "trace-42"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-42"
    assert len(https.get("/health").headers["x-request-id"]) == 32  # made up when the client sends none


def test_cors_preflight_needs_no_key_and_the_answer_names_the_origin(https):
    preflight = https.options("/v1/completions", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                                          "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    other = https.options("/v1/completions", headers={"Origin": "http://evil.example",
                                                      "Access-Control-Request-Method": "POST"})
    assert other.status_code == 400
    answer = https.get("/v1/models", headers={**auth(), "Origin": ORIGIN})
    assert answer.headers["access-control-allow-origin"] == ORIGIN


def test_vllms_own_metrics_are_served_next_to_the_servers(https):
    https.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth())
    text = https.get("/metrics").text
    for name in ["vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "tablefree_requests_total"]:
        assert name in text, name


def test_chat_with_the_operators_template(client, tiny_checkpoint):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of UK?"}]
    rendered = AutoTokenizer.from_pretrained(tiny_checkpoint).apply_chat_template(
        messages, chat_template=TEMPLATE.read_text(), tokenize=False, add_generation_prompt=True)
    assert rendered == "System: Be brief.\nUser: What is the capital of UK?\nAssistant:"
    kwargs = dict(model="tiny", max_tokens=12, temperature=0)
    chat = client.chat.completions.create(messages=messages, **kwargs, logprobs=True, top_logprobs=2)
    plain = client.completions.create(prompt=rendered, **kwargs, logprobs=2)
    message = chat.choices[0].message
    assert message.role == "assistant" and message.content == plain.choices[0].text
    assert [e.token for e in chat.choices[0].logprobs.content] == plain.choices[0].logprobs.tokens
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens and chat.object == "chat.completion"
    chunks = list(client.chat.completions.create(messages=messages, **kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert chunks[-1].usage.completion_tokens == 12
    with pytest.raises(openai.BadRequestError, match="unknown role") as refused:
        client.chat.completions.create(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}], **kwargs)
    assert refused.value.body["param"] == "messages"
