"""The FastAPI app: OpenAI-compatible routes over one in-process vLLM AsyncLLM."""

import hmac
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse

from .completions import Completions
from .errors import APIError, error_body, error_response, install_error_handlers
from .metrics import Metrics
from .protocol import CompletionRequest, DetokenizeRequest, TokenizeRequest
from .settings import ServerSettings

OPEN_PATHS = ("/health", "/metrics")  # no API key needed, like vLLM's server


@dataclass
class ServedModel:
    name: str
    path: str
    max_model_len: int
    created: int
    note: str  # shown in /v1/models, e.g. that the demo has random weights


class Admission:
    """At most `limit` completion requests in flight; the rest get 429 with Retry-After."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_flight = limit, 0

    def enter(self) -> None:
        if self.in_flight >= self.limit:
            raise APIError(429, f"server is at its limit of {self.limit} concurrent requests; retry shortly",
                           None, "too_many_requests", {"Retry-After": "1"})
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1


def create_app(settings: ServerSettings, engine, served: ServedModel) -> FastAPI:
    """`engine` is a started vLLM AsyncLLM; the app shuts it down when it stops."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="tablefree", lifespan=lifespan)
    install_error_handlers(app)
    tokenizer = engine.get_tokenizer()
    metrics = Metrics(engine.get_num_unfinished_requests)
    vocab_size = engine.model_config.get_vocab_size()
    completions = Completions(engine, tokenizer, served.name, served.max_model_len, vocab_size, metrics)
    admission = Admission(settings.max_concurrent_requests)
    api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        route = request.url.path
        try:
            if api_key and not route.startswith(OPEN_PATHS):
                scheme, _, given = request.headers.get("authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), api_key):
                    raise APIError(401, "missing or wrong API key (Authorization: Bearer <key>)", None, "invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > settings.max_request_bytes):
                raise APIError(413, f"request body is larger than {settings.max_request_bytes} bytes", None,
                               "request_too_large")
            response = await call_next(request)
        except APIError as err:
            response = error_response(err.status, err.message, err.param, err.code, err.headers)
        metrics.requests.labels(route if route in KNOWN_ROUTES else "other", str(response.status_code)).inc()
        return response

    def check_model(name: str | None) -> None:
        if name is not None and name != served.name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {served.name!r}", "model",
                           "model_not_found")

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = completions.prompts(body.prompt)
        params = completions.sampling_params(body, prompts)
        admission.enter()
        if not body.stream:
            try:
                return await completions.complete(body, prompts, params)
            finally:
                admission.leave()

        async def events():
            try:
                async for chunk in completions.stream(body, prompts, params):
                    yield {"data": JSONResponse(chunk).body.decode()}
            except APIError as err:  # after the 200: the error goes in the stream, as vLLM does
                yield {"data": JSONResponse(error_body(err.status, err.message, err.param, err.code)).body.decode()}
            finally:
                admission.leave()
            yield {"data": "[DONE]"}

        # "\n" framing, as OpenAI and vLLM send it (some clients split only on "\n\n"); keep-alive
        # comments every 15 s keep proxies from closing streams that wait in the queue.
        return EventSourceResponse(events(), ping=15, sep="\n")

    @app.post("/v1/chat/completions")
    async def chat_completions():
        raise APIError(404, "this is a base model with no chat template: use /v1/completions with a plain prompt",
                       None, "chat_not_supported")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": served.name, "object": "model", "created": served.created, "owned_by": "tablefree",
            "root": served.path, "max_model_len": served.max_model_len, "note": served.note,
        }]}

    @app.get("/health")
    async def health():
        if engine.errored or not engine.is_running:
            return error_response(503, "engine is not running", None, "engine_dead")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        ids = tokenizer.encode(body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        completions.check_ids(body.tokens, "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    KNOWN_ROUTES = {route.path for route in app.routes}
    return app
