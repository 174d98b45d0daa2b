"""`tablefree serve`: bind the port, load the engine, serve until a signal or the engine's death."""

import argparse
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import psutil
import uvicorn

from .app import create_app
from .engine import build_engine, engine_args
from .lifecycle import Server, interruptible_startup
from .settings import ServerSettings

log = logging.getLogger("tablefree.server")
GRACEFUL_CLOSE_S = 5  # uvicorn's wait for connections after the drain (they are idle by then)


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound but not yet listening: a taken port fails now, not after loading,
    and clients are refused (not left hanging) until the engine is ready."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def load(args: argparse.Namespace, settings: ServerSettings):
    """The engine and what it serves (the demo checkpoint is built first if needed)."""
    options, served = engine_args(args, settings)
    return build_engine(options, served), served


def load_engine(args: argparse.Namespace, settings: ServerSettings):
    """Load in a thread while this (main) thread waits where a signal can reach it.

    Loading blocks in C calls (zmq polls) that a signal does not interrupt when another thread
    receives it; a wait with a short timeout returns to Python often enough to stop promptly.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-load")
    future = pool.submit(load, args, settings)
    try:
        with interruptible_startup():
            while True:
                try:
                    return future.result(timeout=0.2)
                except FutureTimeout:
                    continue
    finally:
        pool.shutdown(wait=False)


def serve(args: argparse.Namespace, settings: ServerSettings) -> int:
    """The process's exit code: 0 after a signal, 1 when the engine died, 2 when the port is taken."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        sock = bind(settings.host, settings.port)
    except OSError as err:
        log.error("cannot bind %s:%d: %s", settings.host, settings.port, err.strerror)
        return 2
    log.info("bound %s:%d; loading the engine (the port opens when it is ready)", settings.host, settings.port)
    try:
        engine, served = load_engine(args, settings)
    except KeyboardInterrupt:  # SIGTERM or SIGINT while loading
        log.info("stopped during start-up")
        for child in psutil.Process().children(recursive=True):  # the engine's processes, half started
            child.kill()
        return 0
    app, lifecycle = create_app(settings, engine, served)
    config = uvicorn.Config(app, log_level=settings.uvicorn_log_level, timeout_graceful_shutdown=GRACEFUL_CLOSE_S,
                            root_path=settings.root_path, ssl_keyfile=settings.ssl_keyfile,
                            ssl_certfile=settings.ssl_certfile, ssl_ca_certs=settings.ssl_ca_certs)
    Server(config, lifecycle).run(sockets=[sock])
    return lifecycle.exit_code
