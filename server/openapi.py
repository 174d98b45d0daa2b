"""The OpenAPI document, made to say what the server really does.

FastAPI documents a 422 the server never sends (validation errors are 400s here) and
nothing of the errors it does send; this adds the OpenAI error object for each status a
route can answer, describes the event stream, and drops the 422. FastAPI also passes schemas through float-typed bounds (2**63 - 1 would
come out as 2**63), so the models' schemas are put back exactly as pydantic writes them.
"""

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import protocol
from .protocol import ErrorResponse

ERROR_STATUSES = {
    400: "invalid request: the error's `param` names the field",
    401: "missing or wrong API key (only when the server runs with --api-key)",
    404: "unknown model",
    413: "request body larger than --max-request-bytes",
    415: "body not sent as application/json",
    429: "at the concurrency limit; retry after `Retry-After` seconds",
    503: "engine not running, or the server is shutting down",
}
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in ERROR_STATUSES.items()}
SSE_RESPONSE = {200: {
    "description": "a completion; with `stream: true`, Server-Sent Events: `data: {chunk}` lines (a chunk is a "
    "text_completion object with the new text of one choice; with stream_options.include_usage a last chunk "
    "with no choices carries `usage`), errors after the start as `data: {error object}`, then `data: [DONE]`",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}}


def describe_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            components.update(exact_schemas(components))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def exact_schemas(names) -> dict:
    models = [m for m in vars(protocol).values() if isinstance(m, type) and issubclass(m, BaseModel) and
              m.__module__ == protocol.__name__ and m.__name__ in names]
    modes = [(m, "validation" if issubclass(m, protocol.APIModel) else "serialization") for m in models]
    _, top = models_json_schema(modes, ref_template="#/components/schemas/{model}")
    return top.get("$defs", {})
