"""Load at the server's limits: 256 concurrent streams give what the same requests give one at a
time (an engine that runs one sequence at a time, in a process of its own), and beyond the
default limit of 256 sequences clients get 429 with Retry-After, never anything else."""

import asyncio
import json

import httpx
import pytest
from transformers import AutoTokenizer

from .conftest import auth
from .live_server import wait_for_metric
from .parity import TIE_GAP, generate_in_subprocess

pytest.importorskip("vllm")
pytestmark = pytest.mark.serial  # timing-sensitive: run alone (README's test command)

LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=None)


def prompt(i: int) -> str:
    return f"request {i}: " + "xyz"[i % 3] * (i % 11)


def body(i: int) -> dict:
    return {"model": "tiny", "prompt": prompt(i), "max_tokens": 32,
            "temperature": 0, "ignore_eos": True, "logprobs": 2, "return_tokens_as_token_ids": True,
            "return_token_ids": True, "stream": True}


async def stream(http: httpx.AsyncClient, request: dict) -> tuple[int, dict, list[int], list[dict]]:
    """(status, headers, generated token ids, top logprobs per token)."""
    tokens, tops = [], []
    async with http.stream("POST", "/v1/completions", json=request, headers=auth()) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, response.headers, tokens, tops
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                tokens += choice["token_ids"]
                tops += (choice["logprobs"] or {}).get("top_logprobs") or []
    return 200, response.headers, tokens, tops


def same_or_near_tie(together: tuple[list[int], list[dict]], alone: tuple[list[int], list[dict]]) -> bool:
    """As the parity tests: where the picks differ, each is in the other's top 2 within 1e-4; stop there."""
    for step, (a, b) in enumerate(zip(together[0], alone[0], strict=True)):
        if a != b:
            top_a, top_b = together[1][step], alone[1][step]
            return (b in top_a and a in top_b and abs(top_a[a] - top_a[b]) < TIE_GAP
                    and abs(top_b[a] - top_b[b]) < TIE_GAP)
    return True


def test_256_concurrent_streams_equal_the_same_requests_one_at_a_time(server, tiny_checkpoint):
    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=600, limits=LIMITS) as http:
            return await asyncio.gather(*(stream(http, body(i)) for i in range(256)))

    together = asyncio.run(run())
    assert [status for status, *_ in together] == [200] * 256
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    alone = generate_in_subprocess(tiny_checkpoint, [tokenizer.encode(prompt(i)) for i in range(256)], max_num_seqs=1)
    served = [(tokens, [{int(k.removeprefix("token_id:")): v for k, v in top.items()} for top in tops])
              for _, _, tokens, tops in together]
    assert all(len(tokens) == 32 for tokens, _ in served)
    differ = [i for i in range(256) if not same_or_near_tie(served[i], alone[i])]
    assert not differ, differ


def test_beyond_the_default_limit_clients_get_429_with_retry_after(server):
    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=600, limits=LIMITS) as http:
            return await asyncio.gather(*(stream(http, {**body(i), "logprobs": None}) for i in range(512)))

    results = asyncio.run(run())
    statuses = [status for status, *_ in results]
    assert set(statuses) == {200, 429}, sorted(set(statuses))
    assert all(headers.get("retry-after") == "1" for status, headers, *_ in results if status == 429)
    assert all(len(tokens) == 32 for status, _, tokens, _ in results if status == 200)
    assert wait_for_metric(server, "tablefree_admitted_sequences", 0, within=5) == 0
    assert wait_for_metric(server, "tablefree_engine_unfinished_requests", 0, within=2) == 0
