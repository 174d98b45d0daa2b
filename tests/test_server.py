"""`tablefree serve` as a live uvicorn server, driven by the openai SDK and raw HTTP."""

import asyncio
import re
import shutil

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import model_impl  # noqa: F401  registers the Auto classes
from model_impl import TokenCode
from model_impl.code_rows import code_rows

from .conftest import KEY, PROMPT, auth, serve_cmd
from .live_server import free_port, live_server
from .parity import generate_in_subprocess

pytest.importorskip("vllm")
pytestmark = pytest.mark.serial  # timing-sensitive: run alone (README's test command)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)


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


def test_sdk_raises_its_own_exception_types(client, server):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt=PROMPT, logprobs=21)
    assert bad.value.body["param"] == "logprobs"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).completions.create(
            model="tiny", prompt=PROMPT)
    with pytest.raises(openai.NotFoundError, match="base model"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


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


CODES_ERRORS = [
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": 5}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "values": 0}, 400, "values"),
    ({"model": "tiny", "prompt": "x", "values": 65}, 400, "values"),
    ({"model": "tiny", "prompt": "x" * 600}, 400, "prompt"),  # longer than the context: not what the model reads
    ({"model": "nope", "prompt": "x"}, 404, "model"),
]


def test_codes_route_shows_what_the_model_reads(server, tiny_checkpoint):
    body = {"model": "tiny", "prompt": PROMPT, "values": 8}
    response = httpx.post(f"{server}/v1/codes", json=body, headers=auth(), timeout=60)
    assert response.status_code == 200, response.text
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    expected = code_rows(AutoTokenizer.from_pretrained(tiny_checkpoint), TokenCode.from_config(config), PROMPT, 8)
    assert response.json()["data"] == [row.as_dict() for row in expected]
    layout = response.json()["layout"]
    assert (layout["matrix"], layout["shift"], layout["width"]) == (config.code_matrix, config.code_shift, 64)
    assert httpx.post(f"{server}/v1/codes", json=body, timeout=60).status_code == 401
    ignored = httpx.post(f"{server}/v1/codes", json={**body, "value": 3}, headers=auth(), timeout=60)
    assert ignored.status_code == 200 and ignored.headers["X-Ignored-Fields"] == "value"  # as every route does
    for bad, status, param in CODES_ERRORS:
        error = httpx.post(f"{server}/v1/codes", json=bad, headers=auth(), timeout=60)
        assert error.status_code == status and error.json()["error"]["param"] == param, (bad, error.text)


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
    """A second server: the emoji model, at most one sequence in flight, unknown fields refused."""
    port = free_port()
    with live_server(serve_cmd(emoji_checkpoint, port, "--max-concurrent-requests", "1", "--strict-fields"),
                     port) as base:
        yield base


def test_logprob_tokens_and_offsets_around_characters_split_over_byte_tokens(small_server, emoji_checkpoint):
    """Each byte token is named by its piece, and every byte of a character points at where it starts."""
    client = openai.OpenAI(base_url=f"{small_server}/v1", api_key="unused", max_retries=0)
    kwargs = dict(model=str(emoji_checkpoint), prompt=[ord("a")], max_tokens=8, temperature=0, logprobs=1)
    plain = client.completions.create(**kwargs).choices[0]
    assert plain.text == "😀😀"
    assert plain.logprobs.tokens == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"] * 2
    assert plain.logprobs.text_offset == [0, 0, 0, 0, 1, 1, 1, 1]
    echoed = client.completions.create(**kwargs, echo=True).choices[0]
    assert echoed.text == "a😀😀" and echoed.logprobs.text_offset == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    streamed = [c.choices[0].logprobs for c in client.completions.create(**kwargs, stream=True)]
    assert sum((lp.text_offset for lp in streamed), []) == plain.logprobs.text_offset


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


def test_null_means_the_default_as_the_sdk_sends_it(client):
    """The openai SDK sends `null` for every parameter a caller sets to None; vLLM reads it as the default."""
    kwargs = dict(model="tiny", prompt=PROMPT, seed=5, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kwargs)
    nulls = client.completions.create(
        **kwargs, max_tokens=None, temperature=None, top_p=None, n=None, stream=None, echo=None, logprobs=None,
        stop=None, presence_penalty=None, frequency_penalty=None, logit_bias=None, best_of=None, user=None,
        suffix=None, stream_options=None,
    )
    assert nulls.choices[0].text == plain.choices[0].text
    assert nulls.usage.completion_tokens == plain.usage.completion_tokens == 16  # max_tokens' default


def test_echo_without_generation_scores_the_prompt_like_transformers(client, tiny_checkpoint):
    """How lm-evaluation-harness computes log-likelihoods: echo, logprobs, max_tokens 0."""
    ids = AutoTokenizer.from_pretrained(tiny_checkpoint).encode(PROMPT)
    response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    choice = response.choices[0]
    assert choice.text == PROMPT and response.usage.completion_tokens == 0
    assert len(choice.logprobs.tokens) == len(ids) and choice.logprobs.token_logprobs[0] is None
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs[1:]), expected, rtol=0, atol=1e-4)


def test_best_of_returns_the_samples_with_the_highest_cumulative_logprob(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11,
                  extra_body={"ignore_eos": True})
    candidates = client.completions.create(**kwargs, n=4, logprobs=0).choices  # the same 4 samples, with logprobs
    total = {c.text: sum(c.logprobs.token_logprobs) for c in candidates}
    best = client.completions.create(**kwargs, n=2, best_of=4)
    assert [c.text for c in best.choices] == sorted(total, key=total.get, reverse=True)[:2]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == 4 * 8  # every candidate was generated


def test_a_generation_that_does_not_fit_is_shortened_to_the_context(client):
    response = client.completions.create(model="tiny", prompt=[7] * 500, max_tokens=100, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 512 - 500 and response.choices[0].finish_reason == "length"


def test_unknown_fields_are_ignored_and_named_in_a_header(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    extra = {"num_beams": 3, "max_new_tokens": 4, "stream_options": None}
    plain = httpx.post(f"{server}/v1/completions", json=body, headers=auth(), timeout=60)
    tolerated = httpx.post(f"{server}/v1/completions", json={**body, **extra}, headers=auth(), timeout=60)
    assert tolerated.status_code == 200, tolerated.text
    assert tolerated.headers["x-ignored-fields"] == "max_new_tokens, num_beams"
    assert "x-ignored-fields" not in plain.headers
    assert tolerated.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]


def test_strict_fields_refuses_unknown_fields(small_server):
    response = httpx.post(f"{small_server}/v1/completions", json={"prompt": "a", "num_beams": 3}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "num_beams"


def test_prefix_cache_hits_are_reported_as_cached_tokens(client):
    prompt = [11, 12, 13, 14] * 40  # 160 tokens: several full KV blocks
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=1)
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=1)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < len(prompt)


def test_tokenize_options_and_tokenizer_info(server, tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    body = {"prompt": "hello the test", "add_special_tokens": True, "return_token_strs": True}
    result = httpx.post(f"{server}/tokenize", json=body, headers=auth()).json()
    assert result["tokens"] == tokenizer.encode(body["prompt"], add_special_tokens=True)
    assert result["token_strs"] == tokenizer.convert_ids_to_tokens(result["tokens"])
    info = httpx.get(f"{server}/tokenizer_info", headers=auth()).json()
    assert info["eos_token"] == "</s>" and info["tokenizer_class"]


def test_ping_and_version_are_open(server):
    from importlib.metadata import version

    assert httpx.get(f"{server}/ping").status_code == 200 and httpx.post(f"{server}/ping").status_code == 200
    assert httpx.get(f"{server}/version").json() == {"version": version("tablefree"), "vllm": vllm_version()}


def vllm_version() -> str:
    import vllm

    return vllm.__version__.split("+")[0]
