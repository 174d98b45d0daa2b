"""OpenAI error objects: every client mistake is a 4xx naming the offending field."""

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from vllm.exceptions import VLLMClientError, VLLMNotFoundError, VLLMValidationError
from vllm.v1.engine.exceptions import EngineDeadError

from .protocol import CompletionRequest, DetokenizeRequest

log = logging.getLogger("tablefree.server")

ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable"}

# Messages for fields whose union types make pydantic's own message unhelpful.
FIELD_HINTS = {
    "prompt": "prompt must be a non-empty string, a list of non-empty strings, a list of token ids or a list of "
    "non-empty lists of token ids",
    "stop": "stop must be a non-empty string or a list of at most 64 non-empty strings",
}
TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}
# vLLM names some parameters after its own internals; clients know them by the request's names.
REQUEST_FIELDS = set(CompletionRequest.model_fields) | set(DetokenizeRequest.model_fields)
VLLM_PARAMS = {"input_text": "prompt", "input_tokens": "prompt", "max_model_len": "max_tokens"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_json(err: "APIError") -> bytes:
    return json.dumps(err.body()).encode()


class BodyTooLarge(StarletteHTTPException):
    """Raised while a body arrives past the limit; an HTTPException, so FastAPI's body parsing passes it on."""

    def __init__(self, limit: int) -> None:
        self.error = APIError(413, f"request body is larger than {limit} bytes", None, "request_too_large")
        super().__init__(413, self.error.message)


def shutting_down() -> APIError:
    return APIError(503, "server is shutting down; retry on another instance", None, "shutting_down",
                    {"Retry-After": "1", "Connection": "close"})


def engine_dead() -> APIError:
    return APIError(503, "engine is not running", None, "engine_dead")


def engine_error(err: BaseException) -> BaseException:
    """The engine's exceptions as API errors: its request checks are 400s, a dead engine 503."""
    if isinstance(err, VLLMValidationError):
        # Some of vLLM's checks name no parameter but start with it ("n must be 1 when ...").
        param = err.parameter or next(iter(str(err).split()), "").strip("`")
        param = VLLM_PARAMS.get(param, param)
        param = param if param in REQUEST_FIELDS else None
        return APIError(400, str(err), param, "invalid_value")
    if isinstance(err, VLLMNotFoundError):
        return APIError(404, str(err), None, "not_found")
    if isinstance(err, (VLLMClientError, ValueError, OverflowError)):  # request checks inside the engine
        return APIError(400, str(err), None, "invalid_value")
    if isinstance(err, EngineDeadError):
        return engine_dead()
    return err


@contextmanager
def engine_errors() -> Iterator[None]:
    """Re-raise the engine's exceptions as API errors (others unchanged)."""
    try:
        yield
    except APIError:
        raise
    except Exception as err:
        mapped = engine_error(err)
        if mapped is err:
            raise
        raise mapped from err


def validation_param(loc: tuple) -> str | None:
    """("body", "stream_options", "include_usage") -> "stream_options.include_usage".

    List indexes and pydantic's union-branch tags ("list[int]", "constrained-str") are not
    field names: only identifiers that are not type tags are kept.
    """
    fields = [p for p in loc[1:] if isinstance(p, str) and p.isidentifier() and p not in TYPE_TAGS]
    return ".".join(fields) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # A union field reports one error per branch: a check of our own (value_error) says the most.
        first = next((e for e in errors if e["type"] == "value_error"), errors[0])
        if first["type"] == "json_invalid":
            return APIError(400, "request body is not valid JSON", None, "invalid_json").response()
        param = validation_param(tuple(first["loc"]))
        if param is None and first["type"] in ("model_attributes_type", "dict_type"):
            return APIError(400, "request body must be a JSON object", None, "invalid_type").response()
        hint = FIELD_HINTS.get(param) if first["type"] != "value_error" else None
        message = hint or (f"{param}: {first['msg']}" if param else first["msg"])
        return APIError(400, message, param, first["type"]).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyTooLarge):
            return exc.error.response()
        code = str(exc.detail).lower().replace(" ", "_")  # "Method Not Allowed" -> "method_not_allowed"
        return APIError(exc.status_code, str(exc.detail), None, code, exc.headers).response()
