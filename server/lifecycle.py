"""The server's life: admission, draining shutdown and the engine watchdog.

On SIGTERM or SIGINT the server stops admitting API requests (503, and /health turns 503),
lets those in flight finish for up to `--shutdown-timeout` seconds, then aborts the rest
in the engine (their streams end with an error event and `data: [DONE]`, plain requests
get a 503), stops uvicorn, shuts the engine down and exits 0. A second signal skips the
wait. When the engine dies the server answers 503 for a moment (health checks see it),
then stops the same way and exits 1, so a supervisor restarts it, as vLLM's watchdog does.
"""

import asyncio
import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn
from sse_starlette.sse import AppStatus

from .errors import APIError

log = logging.getLogger("tablefree.server")

ABORTED_GRACE_S = 5.0  # after aborting, how long the aborted responses get to go out
WATCHDOG_INTERVAL_S = 0.5
DEAD_ENGINE_GRACE_S = 2.0  # answer 503 this long after the engine died, so health checks see it, then exit


class Admission:
    """At most `limit` engine sequences in flight; beyond it 429 with Retry-After.

    A request holds its sequences (prompts x n) until its response has been sent or
    abandoned: the release is registered with the request and run by the middleware.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.in_flight = limit, 0

    def admit(self, sequences: int, cleanups: list[Callable[[], None]]) -> None:
        if self.in_flight + sequences > self.limit:
            raise APIError(429, f"server is at its limit of {self.limit} concurrent sequences; retry shortly",
                           None, "too_many_requests", {"Retry-After": "1"})
        self.in_flight += sequences
        cleanups.append(lambda: self.release(sequences))

    def release(self, sequences: int) -> None:
        self.in_flight -= sequences


class Lifecycle:
    """Counts API requests in flight and runs the drain; owns the process's exit code."""

    def __init__(self, engine, abort_all: Callable, shutdown_timeout: float) -> None:
        self.engine, self.abort_all, self.shutdown_timeout = engine, abort_all, shutdown_timeout
        self.in_flight = 0
        self.draining = False
        self.exit_code = 0
        self.server: uvicorn.Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.signals = 0
        self.hurry = asyncio.Event()  # set by a second signal: skip the wait
        self.tasks: set[asyncio.Task] = set()

    @property
    def engine_dead(self) -> bool:
        return self.engine.errored or not self.engine.is_running

    # ---- called by the app ------------------------------------------------------------------------
    def started(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.spawn(self.watchdog())
        # sse-starlette would cut every stream at once when uvicorn sees a signal; the drain decides instead.
        AppStatus.disable_automatic_graceful_drain()

    def stopped(self) -> None:
        for task in self.tasks:
            task.cancel()

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- signals ----------------------------------------------------------------------------------
    def on_signal(self, sig: int) -> None:
        """Runs in the signal handler: hand over to the loop."""
        self.signals += 1
        if self.signals == 1:
            log.info("%s: draining (up to %.0f s for requests in flight)", signal.Signals(sig).name,
                     self.shutdown_timeout)
            self.loop.call_soon_threadsafe(self.spawn, self.drain(self.shutdown_timeout))
        elif self.signals == 2:
            log.warning("second signal: aborting requests in flight now")
            self.loop.call_soon_threadsafe(self.hurry.set)
        else:
            self.server.force_exit = self.server.should_exit = True

    async def watchdog(self) -> None:
        while not self.engine_dead:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
        log.error("the engine died: stopping the server (exit code 1) so a supervisor restarts it")
        self.exit_code = 1
        await asyncio.sleep(DEAD_ENGINE_GRACE_S)
        await self.drain(0.0)

    async def drain(self, timeout: float) -> None:
        if self.draining:
            return
        self.draining = True
        if not await self.idle_within(timeout):
            log.warning("%d request(s) still in flight: aborting them", self.in_flight)
            if not self.engine_dead:
                await self.abort_all()
            await self.idle_within(ABORTED_GRACE_S)
        AppStatus.should_exit = True  # any stream still open (there should be none) now closes
        self.server.should_exit = True

    async def idle_within(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_flight and loop.time() < deadline and not self.hurry.is_set():
            await asyncio.sleep(0.05)
        return not self.in_flight


class Server(uvicorn.Server):
    """uvicorn, with its signal handling replaced by the drain (and no re-raised signal at exit)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        lifecycle.server = self

    def handle_exit(self, sig: int, frame) -> None:
        self.lifecycle.on_signal(sig)


@contextmanager
def interruptible_startup() -> Iterator[None]:
    """While the engine loads (minutes), SIGTERM stops the process like Ctrl-C does.

    As PID 1 in a container a signal with no handler is ignored, so both get one.
    """
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
