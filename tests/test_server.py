"""`tablefree serve` as a live uvicorn server, driven by the openai SDK and raw HTTP."""

import asyncio
import re
import shutil
import sys

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import model_impl  # noqa: F401  registers the Auto classes

from .live_server import free_port, live_server
from .parity import generate_in_subprocess

pytest.importorskip("vllm")

KEY = "sk-tablefree-test"
PROMPT = "Question: What is the capital of UK?\nAnswer:"


def serve_cmd(checkpoint, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--model", str(checkpoint), "--port", str(port), "--dtype", "float32",
            "--max-model-len", "512", "--kv-cache-gb", "0.25", *extra]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    port = free_port()
    with live_server(serve_cmd(tiny_checkpoint, port, "--api-key", KEY, "--served-model-name", "tiny"), port) as base:
        yield base


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def test_greedy_completions_equal_the_offline_engine(client, tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    prompts = [PROMPT, "hello the test", "Лондон 🇬🇧", "a"]
    offline = generate_in_subprocess(tiny_checkpoint, [tokenizer.encode(p) for p in prompts])
    response = client.completions.create(model="tiny", prompt=prompts, max_tokens=32, temperature=0,
                                         extra_body={"ignore_eos": True})
    texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    assert texts == [tokenizer.decode(tokens, skip_special_tokens=True) for tokens, _ in offline]
    assert [c.finish_reason for c in response.choices] == ["length"] * 4
    assert response.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    assert response.usage.completion_tokens == 4 * 32


def test_streaming_matches_the_plain_response_and_reports_usage(client):
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason


def test_stream_framing_is_plain_sse(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    raw = httpx.post(f"{server}/v1/completions", json=body, headers=auth(), timeout=60).content.decode()
    events = raw.split("\n\n")
    assert "\r" not in raw and events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert '"usage"' in events[-3]


def test_logprobs_and_echo(client, tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                         echo=True)
    choice = response.choices[0]
    n_prompt = len(tokenizer.encode(PROMPT))
    lp = choice.logprobs
    assert choice.text.startswith(PROMPT) and len(lp.tokens) == n_prompt + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(3 <= len(top) <= 4 for top in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    # greedy: each generated token is the best of its top logprobs
    for token, top in zip(lp.tokens[n_prompt:], lp.top_logprobs[n_prompt:]):
        assert top[token] == max(top.values())


def test_n_samples_with_a_seed_repeat(client):
    def run():
        response = client.completions.create(model="tiny", prompt=["x", "y"], max_tokens=8, n=3, temperature=1.0,
                                             seed=7)
        return [c.text for c in sorted(response.choices, key=lambda c: c.index)]

    first = run()
    assert len(first) == 6 and len(set(first)) > 1 and run() == first


def test_stop_string_spanning_tokens_is_never_emitted(client):
    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0)
    tokens = base.choices[0].logprobs.tokens
    cut = len("".join(tokens[:6]))  # a stop string across the boundary of tokens 6 and 7
    text = base.choices[0].text
    stop = text[cut - 1 : cut + 1]
    expected = text[: text.index(stop)]
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    streamed = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                              stop=stop, stream=True))
    assert plain.choices[0].text == expected and plain.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


async def _one(aclient, i: int, stream: bool) -> str:
    kwargs = dict(model="tiny", prompt=f"request {i}: " + "x" * (i % 7), max_tokens=12, temperature=0)
    if not stream:
        return (await aclient.completions.create(**kwargs)).choices[0].text
    return "".join([c.choices[0].text async for c in await aclient.completions.create(**kwargs, stream=True)])


def test_64_concurrent_requests_equal_the_same_requests_one_at_a_time(server):
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300) as aclient:
            together = await asyncio.gather(*(_one(aclient, i, i % 2 == 0) for i in range(64)))
            alone = [await _one(aclient, i, False) for i in range(64)]
        return together, alone

    together, alone = asyncio.run(run())
    assert together == alone


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_disconnected_streams_are_aborted_in_the_engine(server):
    async def disconnect_ten():
        async with httpx.AsyncClient(base_url=server, headers=auth(), timeout=60) as http:
            async def one(i):
                body = {"model": "tiny", "prompt": f"long {i}", "max_tokens": 400, "ignore_eos": True, "stream": True}
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    lines = response.aiter_lines()
                    while not (await anext(lines)).startswith("data: {"):
                        pass
                # leaving the block closes the connection mid-stream

            await asyncio.gather(*(one(i) for i in range(10)))

    asyncio.run(disconnect_ten())
    for _ in range(50):
        if _metric(server, "tablefree_engine_unfinished_requests") == 0:
            break
        asyncio.run(asyncio.sleep(0.2))
    assert _metric(server, "tablefree_engine_unfinished_requests") == 0
    assert _metric(server, "tablefree_num_requests_running") == 0
    assert _metric(server, "tablefree_num_requests_waiting") == 0
    # each was stopped long before its 400 tokens
    assert _metric(server, "tablefree_generation_tokens_total") < 10 * 400


def test_sdk_raises_its_own_exception_types(client, server):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt=PROMPT, logprobs=9)
    assert bad.value.body["param"] == "logprobs"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).completions.create(
            model="tiny", prompt=PROMPT)
    with pytest.raises(openai.NotFoundError, match="base model"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


BIG = "x" * (5 << 20)
MALFORMED = [
    # (body, expected status, expected param)
    ({"prompt": PROMPT}, 400, "model"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny", "prompt": [[]]}, 400, "prompt"),
    ({"model": "tiny", "prompt": [1, "a"]}, 400, "prompt"),
    ({"model": "tiny", "prompt": [65536]}, 400, "prompt"),
    ({"model": "tiny", "prompt": [[1, 2], [-1]]}, 400, "prompt"),
    ({"model": "tiny", "prompt": 42}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 600}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x" * 600}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "top_k": -5}, 400, "top_k"),
    ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "logprobs": 1.5}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "x", "logprobs": "3"}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "x", "stop": [""]}, 400, "stop"),
    ({"model": "tiny", "prompt": "x", "stop": 5}, 400, "stop"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"70000": 1}}, 400, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "stop_token_ids": [99999]}, 400, "stop_token_ids"),
    ({"model": "tiny", "prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "tiny", "prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage"),
    ({"model": "tiny", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": "tiny", "prompt": "x", "suffix": "!"}, 400, "suffix"),
    ({"model": "tiny", "prompt": "x", "temprature": 0.5}, 400, "temprature"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "tiny", "prompt": BIG}, 413, None),
]


@pytest.mark.parametrize("body,status,param", MALFORMED, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(MALFORMED)])
def test_malformed_requests_get_openai_errors(server, body, status, param):
    response = httpx.post(f"{server}/v1/completions", json=body, headers=auth(), timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert httpx.get(f"{server}/health").status_code == 200


@pytest.mark.parametrize(
    "request_args,status",
    [
        ({"content": b"{not json", "headers": {**auth(), "content-type": "application/json"}}, 400),
        ({"content": b"[1, 2]", "headers": {**auth(), "content-type": "application/json"}}, 400),
        ({"json": {"model": "tiny", "prompt": "x"}, "headers": {"Authorization": "Bearer wrong"}}, 401),
        ({"json": {"model": "tiny", "prompt": "x"}, "headers": {"Authorization": f"Basic {KEY}"}}, 401),
        ({"json": {"model": "tiny", "prompt": "x"}, "headers": {}}, 401),
    ],
    ids=["invalid-json", "not-an-object", "wrong-key", "not-bearer", "no-key"],
)
def test_raw_http_errors(server, request_args, status):
    response = httpx.post(f"{server}/v1/completions", timeout=60, **request_args)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_models_tokenize_detokenize_health_metrics(server, tiny_checkpoint):
    assert httpx.get(f"{server}/health").status_code == 200  # open without a key
    models = httpx.get(f"{server}/v1/models", headers=auth()).json()["data"]
    assert [(m["id"], m["max_model_len"], m["owned_by"]) for m in models] == [("tiny", 512, "tablefree")]
    tokens = httpx.post(f"{server}/tokenize", json={"prompt": PROMPT}, headers=auth()).json()
    assert tokens["tokens"] == AutoTokenizer.from_pretrained(tiny_checkpoint).encode(PROMPT)
    text = httpx.post(f"{server}/detokenize", json={"tokens": tokens["tokens"]}, headers=auth()).json()
    assert text == {"prompt": PROMPT}
    bad = httpx.post(f"{server}/detokenize", json={"tokens": [70000]}, headers=auth())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    metrics = httpx.get(f"{server}/metrics").text
    for name in ["tablefree_requests_total", "tablefree_time_to_first_token_seconds_bucket",
                 "tablefree_e2e_request_latency_seconds_bucket", "tablefree_prompt_tokens_total",
                 "tablefree_generation_tokens_total", "tablefree_num_requests_running",
                 "tablefree_num_requests_waiting"]:
        assert name in metrics
    assert re.search(r'tablefree_requests_total\{route="/v1/completions",status="200"\} [1-9]', metrics)


EMOJI_BYTES = [0xE000 + b for b in "😀".encode()]  # byte-fallback tokens <0xF0> <0x9F> <0x98> <0x80>


@pytest.fixture(scope="module")
def emoji_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny model rewired so that greedy decoding after "a" spells 😀 forever, 4 byte tokens per character.

    Attention and MLP outputs are zeroed, so the last hidden state depends only on the current
    token's code; lm_head rows then point from each token to its successor in a->F0->9F->98->80->F0.
    """
    out = tmp_path_factory.mktemp("emoji") / "emoji"
    shutil.copytree(tiny_checkpoint, out)
    tensors = load_file(out / "model.safetensors")
    for name in tensors:
        if re.search(r"(o_proj|down_proj)\.(weight|bias)$", name):
            tensors[name].zero_()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    chain = [ord("a"), *EMOJI_BYTES, EMOJI_BYTES[0]]
    with torch.no_grad():
        hidden = model.model(torch.tensor([chain[:-1]])).last_hidden_state[0]
    tensors["lm_head.bias"].zero_()
    for h, successor in zip(hidden, chain[1:]):
        tensors["lm_head.weight"][successor] = 10 * h / h.norm()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def small_server(emoji_checkpoint):
    """A second server: the emoji model, at most one request in flight."""
    port = free_port()
    with live_server(serve_cmd(emoji_checkpoint, port, "--max-concurrent-requests", "1"), port) as base:
        yield base


def test_streamed_multibyte_characters_are_never_split(small_server, emoji_checkpoint):
    client = openai.OpenAI(base_url=f"{small_server}/v1", api_key="unused", max_retries=0)
    kwargs = dict(model=str(emoji_checkpoint), prompt=[ord("a")], max_tokens=40, temperature=0, logprobs=0)
    plain = client.completions.create(**kwargs).choices[0]
    assert plain.text == "😀" * 10  # the continuation: 40 byte tokens
    deltas = [c.choices[0].text for c in client.completions.create(**kwargs, stream=True)]
    assert "".join(deltas) == plain.text
    assert all(d and "\ufffd" not in d for d in deltas if d)


def test_concurrency_limit_answers_429_with_retry_after(small_server, emoji_checkpoint):
    model = str(emoji_checkpoint)

    async def run():
        async with httpx.AsyncClient(base_url=small_server, timeout=120) as http:
            long = {"model": model, "prompt": "x", "max_tokens": 300, "ignore_eos": True, "stream": True}
            async with http.stream("POST", "/v1/completions", json=long) as first:
                assert first.status_code == 200
                lines = first.aiter_lines()
                while not (await anext(lines)).startswith("data: {"):
                    pass
                second = await http.post("/v1/completions", json={"model": model, "prompt": "y"})
                async for _ in lines:
                    pass
            third = await http.post("/v1/completions", json={"model": model, "prompt": "y"})
            return second, third

    second, third = asyncio.run(run())
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["type"] == "rate_limit_error"
    assert third.status_code == 200
