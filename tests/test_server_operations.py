"""Operations as they happen to a deployed server: clients that leave or stop reading, SIGTERM,
SIGINT, a dead engine, a stop during start-up. Each is checked on state: the engine's
unfinished requests, slots usable again, exit codes, processes gone.

A "slow" checkpoint (width 512, 8 layers) makes a 500-token generation take seconds here,
so a request that was really aborted is told apart from one that just finished.
"""

import asyncio
import json
import signal
import socket
import time

import httpx
import psutil
import pytest

from .conftest import auth, serve_cmd, tablefree
from .live_server import ServerProcess, free_port, live_server, session_processes, wait_for_metric

pytest.importorskip("vllm")
pytestmark = pytest.mark.serial  # timing-sensitive: run alone (README's test command)

LONG = {"prompt": "x", "max_tokens": 500, "ignore_eos": True}
MULTIPROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # the engine in its own process, as in production


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("slow") / "slow"
    tablefree("make-checkpoint", str(out), "--preset", "tiny", "--hidden-size", "512", "--num-layers", "8",
              "--num-heads", "16", "--seed", "3")
    return out


@pytest.fixture(scope="module")
def four_slots(slow_checkpoint):
    """At most 4 sequences in flight."""
    port = free_port()
    with live_server(serve_cmd(slow_checkpoint, port, "--max-concurrent-requests", "4"), port) as base:
        yield base


def held(base: str, within: float = 2.0) -> tuple[float, float]:
    """(engine requests, admitted sequences) once both are 0, or as they are after `within` seconds."""
    deadline = time.monotonic() + within
    engine = wait_for_metric(base, "tablefree_engine_unfinished_requests", 0, within)
    return engine, wait_for_metric(base, "tablefree_admitted_sequences", 0, max(deadline - time.monotonic(), 0))


async def four_new_requests(base: str) -> list[int]:
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        body = {"prompt": "y", "max_tokens": 4}
        return [r.status_code for r in await asyncio.gather(*(http.post("/v1/completions", json=body)
                                                             for _ in range(4)))]


def test_disconnected_streams_are_aborted_and_their_slots_freed(four_slots):
    async def leave_after_the_first_chunk(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            while not (await anext(lines)).startswith("data: {"):
                pass
        # leaving the block closes the connection mid-stream

    async def run() -> list:
        states = []
        async with httpx.AsyncClient(base_url=four_slots, timeout=120) as http:
            for _ in range(5):  # 20 streams, 4 at a time (the limit)
                await asyncio.gather(*(leave_after_the_first_chunk(http) for _ in range(4)))
                states.append(held(four_slots))
        return states

    assert asyncio.run(run()) == [(0, 0)] * 5  # within 2 s of leaving; 500 tokens take far longer
    assert asyncio.run(four_new_requests(four_slots)) == [200] * 4


def test_clients_that_time_out_have_their_requests_aborted(four_slots):
    """An SDK timeout on a plain request: the engine stops working on it and the slot is free again."""
    async def time_out(http: httpx.AsyncClient) -> None:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/completions", json=LONG)

    async def run() -> list:
        states = []
        async with httpx.AsyncClient(base_url=four_slots, timeout=httpx.Timeout(120, read=0.5)) as http:
            for _ in range(5):  # 20 requests, 4 at a time
                await asyncio.gather(*(time_out(http) for _ in range(4)))
                states.append(held(four_slots))
        return states

    assert asyncio.run(run()) == [(0, 0)] * 5
    assert asyncio.run(four_new_requests(four_slots)) == [200] * 4


def test_a_client_that_stops_reading_loses_its_stream_not_the_slot(tiny_checkpoint):
    """It holds its socket open and reads nothing: once the send waits past --send-timeout, the
    request is aborted. 16 x 511 tokens with 20 logprobs each is far more than socket buffers hold."""
    port = free_port()
    cmd = serve_cmd(tiny_checkpoint, port, "--send-timeout", "2", "--max-concurrent-requests", "16")
    with live_server(cmd, port) as base:
        body = json.dumps({"prompt": "x", "n": 16, "max_tokens": 511, "logprobs": 20, "ignore_eos": True,
                           "stream": True}).encode()
        with socket.socket() as reader:
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.connect(("127.0.0.1", port))
            reader.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(1)
            assert held(base, within=60) == (0, 0)
            status = httpx.post(f"{base}/v1/completions", json={"prompt": "y", "n": 16, "max_tokens": 2,
                                                                "temperature": 1}, timeout=60).status_code
        assert status == 200  # all 16 slots are free while the reader is still connected


def stream_outcome(lines: list[str]) -> str:
    """'complete' (a finish_reason, then [DONE]), 'error' (an error event, then [DONE]) or what went wrong."""
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return f"cut: {events[-1:]}"
    last = json.loads(events[-2])
    if "error" in last:
        return "error"
    return "complete" if last["choices"][0]["finish_reason"] else f"no finish_reason: {last}"


@pytest.fixture
def spawn():
    """Starts ServerProcesses that are stopped at teardown even when the test fails first."""
    servers: list[ServerProcess] = []

    def start(*args, **kwargs) -> ServerProcess:
        servers.append(ServerProcess(*args, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_drains_streams_then_exits_0_leaving_no_process(spawn, slow_checkpoint, sig):
    timeout = 4
    port = free_port()
    server = spawn(serve_cmd(slow_checkpoint, port, "--shutdown-timeout", str(timeout)), port, MULTIPROCESS)
    server.wait_healthy()
    group = session_processes(server.proc.pid)
    assert len(group) > 1  # the engine core runs in processes of its own

    async def stream(http: httpx.AsyncClient, max_tokens: int) -> str:
        lines = []
        body = {"prompt": "x", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                lines.append(line)
        return stream_outcome(lines)

    async def run():
        async with httpx.AsyncClient(base_url=server.base, timeout=120) as http:
            # 4 that finish within the drain, 4 that cannot (500 tokens take longer than 4 s here)
            streams = [asyncio.create_task(stream(http, n)) for n in [8, 500] * 4]
            await asyncio.sleep(1)
            server.proc.send_signal(sig)
            await asyncio.sleep(0.5)
            during = (await http.get("/health")).status_code, (await http.post("/v1/completions", json=LONG))
            return await asyncio.gather(*streams), during

    started = time.monotonic()
    outcomes, (health, refused) = asyncio.run(run())
    code = server.proc.wait(timeout=timeout + 30)
    took = time.monotonic() - started
    _, alive = psutil.wait_procs(group, timeout=10)
    server.stop()
    assert outcomes[0::2] == ["complete"] * 4 and outcomes[1::2] == ["error"] * 4, outcomes
    assert health == 503 and refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert code == 0 and took < timeout + 5 + 1, (code, took)  # + the second the streams ran before the signal
    assert not alive, alive


def test_a_dead_engine_means_503_then_exit_1(spawn, tiny_checkpoint):
    port = free_port()
    server = spawn(serve_cmd(tiny_checkpoint, port), port, MULTIPROCESS)
    server.wait_healthy()
    core = next(p for p in session_processes(server.proc.pid) if "EngineCore" in p.name())
    killed = time.monotonic()
    core.kill()
    while httpx.get(f"{server.base}/health").status_code != 503:
        time.sleep(0.05)
    started = time.monotonic()
    refused = httpx.post(f"{server.base}/v1/completions", json={"prompt": "x"}, timeout=10)
    answered = time.monotonic() - started
    code = server.proc.wait(timeout=30)
    exited = time.monotonic() - killed
    group = session_processes(server.proc.pid)
    _, alive = psutil.wait_procs(group, timeout=30)  # the engine's worker follows its parent
    server.stop()
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead" and answered < 2
    assert code == 1 and exited < 10, (code, exited)
    assert not alive, alive


def test_sigterm_during_start_up_stops_the_server(spawn, slow_checkpoint):
    """As PID 1 in a container an unhandled SIGTERM is ignored; the server must stop while it loads."""
    port = free_port()
    server = spawn(serve_cmd(slow_checkpoint, port), port, MULTIPROCESS)
    deadline = time.monotonic() + 120
    while not any("EngineCore" in p.name() for p in session_processes(server.proc.pid)):  # loading has begun
        assert time.monotonic() < deadline and server.proc.poll() is None, server.output()[-3000:]
        time.sleep(0.1)
    with pytest.raises(httpx.TransportError):  # still loading: the port is bound but not yet listening
        httpx.get(f"{server.base}/health", timeout=2)
    group = session_processes(server.proc.pid)
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=30)
    _, alive = psutil.wait_procs(group, timeout=30)
    server.stop()
    assert code == 0 and not alive, (code, alive)


def test_a_4mb_prompt_does_not_stall_the_other_requests(server):
    """Tokenizing megabytes takes seconds; it runs off the event loop, so health checks and other
    requests are answered meanwhile (and a completion prompt that cannot fit is refused untokenized)."""
    big = "Question: What is the capital of UK?\nAnswer: London. " * (3_800_000 // 53)  # 3.9 MB of JSON

    async def run() -> list[tuple[str, int]]:
        answered = []
        async with httpx.AsyncClient(base_url=server, headers=auth(), timeout=300) as http:
            async def send(name: str, method: str, path: str, **kwargs) -> None:
                answered.append((name, (await http.request(method, path, **kwargs)).status_code))

            async def meanwhile() -> None:
                await asyncio.sleep(0.5)  # the big body is in, its tokenization under way
                await send("health", "GET", "/health")
                await send("completion", "POST", "/v1/completions", json={"prompt": "x", "max_tokens": 2})
                await send("4 MB completion", "POST", "/v1/completions", json={"prompt": big})

            await asyncio.gather(send("4 MB tokenize", "POST", "/tokenize", json={"prompt": big}), meanwhile())
        return answered

    assert asyncio.run(run()) == [("health", 200), ("completion", 200), ("4 MB completion", 400), ("4 MB tokenize", 200)]
