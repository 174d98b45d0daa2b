"""Every client mistake gets a 4xx OpenAI error object naming the field, and nothing is left behind.

The table holds the malformed requests users and fuzzers were seen sending; each row is
sent as it would arrive (raw JSON where Python's encoder would refuse it), and after each
the server must still be healthy. At the end the engine holds no request.
"""

import json
import math
import socket
import subprocess
import sys

import httpx
import pytest

from .conftest import KEY, auth
from .live_server import free_port, live_server, metric, wait_for_metric

pytest.importorskip("vllm")
pytestmark = pytest.mark.serial  # timing-sensitive: run alone (README's test command)

X = {"model": "tiny", "prompt": "x"}
BIG = "x" * (5 << 20)
MALFORMED = [
    # (body as a dict, or raw JSON text; expected status; expected param)
    ({"model": "tiny"}, 400, "prompt"),
    ({**X, "prompt": ""}, 400, "prompt"),
    ({**X, "prompt": []}, 400, "prompt"),
    ({**X, "prompt": [[]]}, 400, "prompt"),
    ({**X, "prompt": [1, "a"]}, 400, "prompt"),
    ({**X, "prompt": [[1, 2], "a"]}, 400, "prompt"),
    ({**X, "prompt": [65536]}, 400, "prompt"),
    ({**X, "prompt": [[1, 2], [-1]]}, 400, "prompt"),
    ({**X, "prompt": 42}, 400, "prompt"),
    ({**X, "prompt": "x" * 600}, 400, "prompt"),
    ({**X, "prompt": ["x"] * 300}, 400, "prompt"),  # more sequences than a request may start
    ('{"model": "tiny", "prompt": "\\ud800"}', 400, "prompt"),
    ('{"model": "tiny", "prompt": ["ok", "a\\udfffb"]}', 400, "prompt"),
    ({**X, "max_tokens": 0}, 400, "max_tokens"),
    ({**X, "max_tokens": -1}, 400, "max_tokens"),
    ({**X, "max_tokens": "ten"}, 400, "max_tokens"),
    ({**X, "max_tokens": 600}, 400, "max_tokens"),
    ({**X, "max_tokens": 2**64}, 400, "max_tokens"),
    ({**X, "temperature": -1}, 400, "temperature"),
    ({**X, "temperature": "hot"}, 400, "temperature"),
    ('{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    ({**X, "top_p": 0}, 400, "top_p"),
    ({**X, "top_p": 1.5}, 400, "top_p"),
    ({**X, "top_k": -5}, 400, "top_k"),
    ({**X, "top_k": 2**64}, 400, "top_k"),
    ({**X, "min_p": 2}, 400, "min_p"),
    ({**X, "n": 0}, 400, "n"),
    ({**X, "n": 2**40}, 400, "n"),
    ({**X, "n": 300}, 400, "n"),
    ({**X, "n": 2, "temperature": 0}, 400, "n"),
    ({**X, "best_of": 1, "n": 2}, 400, "best_of"),
    ({**X, "best_of": 3, "stream": True}, 400, "best_of"),
    ({**X, "seed": 2**64}, 400, "seed"),
    ({**X, "seed": -(2**63) - 1}, 400, "seed"),
    ({**X, "logprobs": 1.5}, 400, "logprobs"),
    ({**X, "logprobs": "3"}, 400, "logprobs"),
    ({**X, "logprobs": -1}, 400, "logprobs"),
    ({**X, "logprobs": 21}, 400, "logprobs"),  # above the engine's max_logprobs
    ({**X, "stop": [""]}, 400, "stop"),
    ({**X, "stop": 5}, 400, "stop"),
    ({**X, "stop": ["s"] * 65}, 400, "stop"),
    ('{"model": "tiny", "prompt": "x", "stop": ["\\ud800"]}', 400, "stop"),
    ({**X, "stop_token_ids": [99999]}, 400, "stop_token_ids"),
    ({**X, "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ({**X, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({**X, "logit_bias": {"70000": 1}}, 400, "logit_bias"),
    ({**X, "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ({**X, "logit_bias": {"--5": 1}}, 400, "logit_bias"),
    ({**X, "logit_bias": {"²": 1}}, 400, "logit_bias"),
    ({**X, "logit_bias": {"1" * 5000: 1}}, 400, "logit_bias"),
    ({**X, "presence_penalty": 3}, 400, "presence_penalty"),
    ({**X, "frequency_penalty": -3}, 400, "frequency_penalty"),
    ({**X, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ('{"model": "tiny", "prompt": "x", "length_penalty": Infinity}', 400, "length_penalty"),
    ({**X, "echo": "yes"}, 400, "echo"),
    ({**X, "stream": "true"}, 400, "stream"),
    ({**X, "user": 5}, 400, "user"),
    ({**X, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({**X, "stream": True, "stream_options": {"include_usage": "yes"}}, 400, "stream_options.include_usage"),
    ({**X, "suffix": "!"}, 400, "suffix"),
    ({**X, "use_beam_search": True, "stream": True}, 400, "use_beam_search"),
    ({**X, "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs"),
    ({**X, "truncate_prompt_tokens": 600}, 400, "truncate_prompt_tokens"),
    ({**X, "truncation_side": "middle", "truncate_prompt_tokens": 2}, 400, "truncation_side"),
    ({**X, "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({**X, "prompt": BIG}, 413, None),
]


def post(base: str, body, path: str = "/v1/completions") -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {**auth(), "content-type": "application/json"}
    return httpx.post(f"{base}{path}", content=content.encode(), headers=headers, timeout=60)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error")
    assert error["param"] == param, error
    return error


@pytest.mark.parametrize("body,status,param", MALFORMED, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(MALFORMED)])
def test_malformed_completion_requests_get_openai_errors(server, body, status, param):
    assert_error(post(server, body), status, param)
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_lone_surrogate_is_named_as_such(server):
    error = assert_error(post(server, '{"model": "tiny", "prompt": "ab\\ud800"}'), 400, "prompt")
    assert "surrogate" in error["message"]


def test_out_of_vocabulary_ids_use_vllms_wording(server):
    assert "out of vocabulary" in assert_error(post(server, {**X, "prompt": [7, 65536]}), 400, "prompt")["message"]


OTHER_ROUTES = [
    ("/tokenize", '{"prompt": "\\ud800"}', 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model"),
    ("/detokenize", {"tokens": [70000]}, 400, "tokens"),
    ("/detokenize", {"tokens": "12"}, 400, "tokens"),
]


@pytest.mark.parametrize("path,body,status,param", OTHER_ROUTES, ids=[f"{r[0]}-{i}" for i, r in enumerate(OTHER_ROUTES)])
def test_malformed_requests_to_other_routes(server, path, body, status, param):
    assert_error(post(server, body, path), status, param)


RAW = [
    # (method, path, request arguments, status)
    ("POST", "/v1/completions", {"content": b"{not json", "headers": {**auth(), "content-type": "application/json"}}, 400),
    ("POST", "/v1/completions", {"content": b"[1, 2]", "headers": {**auth(), "content-type": "application/json"}}, 400),
    ("POST", "/v1/completions", {"content": json.dumps(X), "headers": {**auth(), "content-type": "text/plain"}}, 415),
    ("POST", "/v1/completions", {"content": json.dumps(X), "headers": auth()}, 415),
    ("POST", "/v1/completions", {"json": X, "headers": {"Authorization": "Bearer wrong"}}, 401),
    ("POST", "/v1/completions", {"json": X, "headers": {"Authorization": f"Basic {KEY}"}}, 401),
    ("POST", "/v1/completions", {"json": X, "headers": {}}, 401),
    ("PUT", "/v1/completions", {"headers": auth()}, 405),
    ("GET", "/v1/completions", {"headers": auth()}, 405),
    ("GET", "/v1/no-such-route", {"headers": auth()}, 404),
]


@pytest.mark.parametrize("method,path,args,status", RAW, ids=[f"{i}-{r[0]}-{r[3]}" for i, r in enumerate(RAW)])
def test_raw_http_errors_are_typed_openai_errors(server, method, path, args, status):
    response = httpx.request(method, f"{server}{path}", timeout=60, **args)
    assert_error(response, status)


def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(server):
    """No Content-Length: the limit is counted on the bytes as they come."""
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(5):
            yield b"x" * (1 << 20)
        yield b'"}'

    response = httpx.post(f"{server}/v1/completions", content=chunks(), timeout=60,
                          headers={**auth(), "content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413)


def test_logprobs_of_minus_infinity_or_nan_are_sent_as_numbers(tiny_checkpoint):
    """JSON has no infinities: -inf (and NaN) go out as -9999.0, as vLLM and OpenAI send them."""
    from transformers import AutoTokenizer
    from vllm.logprobs import Logprob

    from server.logprobs import TextCursor, TokenNames, logprobs_part

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    entries = [{5: Logprob(-math.inf, 2, "a"), 6: Logprob(-0.1, 1, "b")}, {7: Logprob(math.nan, 1, "c")}]
    part = logprobs_part([5, 7], entries, 1, TokenNames(tokenizer), True, TextCursor(tokenizer, True))
    assert part["token_logprobs"] == [-9999.0, -9999.0]
    assert part["top_logprobs"] == [{"token_id:5": -9999.0, "token_id:6": -0.1}, {"token_id:7": -9999.0}]
    json.dumps(part, allow_nan=False)


def test_no_request_is_left_in_the_engine_after_all_the_errors(server):
    assert wait_for_metric(server, "tablefree_engine_unfinished_requests", 0, within=2) == 0
    assert httpx.get(f"{server}/health").status_code == 200
    assert metric(server, "tablefree_num_requests_running") == 0


def test_an_empty_api_key_is_refused_at_start(tiny_checkpoint):
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_checkpoint), "--port", str(port),
         "--api-key", ""], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "API key must not be empty" in proc.stderr


FAULTY_SERVER = """
import sys
from server import completions
from server.cli import main

async def broken(self, *args, **kwargs):
    raise RuntimeError("injected fault")
    yield

completions.Completions.complete = broken
completions.Completions.stream = broken
sys.exit(main(sys.argv[1:]))
"""


def test_an_unexpected_exception_is_a_json_500_counted_in_the_metrics(tiny_checkpoint):
    """A fault injected into the real server (no client input causes one): plain and streamed."""
    port = free_port()
    cmd = [sys.executable, "-c", FAULTY_SERVER, "serve", "--model", str(tiny_checkpoint), "--port", str(port),
           "--dtype", "float32", "--max-model-len", "512", "--kv-cache-gb", "0.25"]
    with live_server(cmd, port) as base:
        plain = httpx.post(f"{base}/v1/completions", json={"prompt": "x"}, timeout=60)
        assert plain.status_code == 500 and plain.json()["error"]["type"] == "server_error"
        streamed = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "stream": True}, timeout=60)
        events = [e for e in streamed.text.split("\n\n") if e]
        assert streamed.status_code == 200 and events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["error"]["type"] == "server_error"
        counted = httpx.get(f"{base}/metrics").text
        assert 'tablefree_requests_total{route="/v1/completions",status="500"} 1.0' in counted
        assert httpx.get(f"{base}/health").status_code == 200
        assert wait_for_metric(base, "tablefree_engine_unfinished_requests", 0, within=2) == 0


def test_a_port_in_use_fails_in_seconds_before_loading(tiny_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_checkpoint), "--port", str(port)],
            capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "address already in use" in proc.stderr.lower() and "Loading weights" not in proc.stderr
