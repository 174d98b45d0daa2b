"""OpenAI error objects: every client mistake is a 4xx naming the offending field."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


# Messages for fields whose union types make pydantic's own message unhelpful.
FIELD_HINTS = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids, "
    "none of them empty",
    "stop": "stop must be a non-empty string or a list of at most 16 non-empty strings",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def validation_param(loc: tuple) -> str | None:
    """("body", "stream_options", "include_usage") -> "stream_options.include_usage".

    List indexes and pydantic's union-branch tags ("list[int]") are not field names.
    """
    fields = [p for p in loc[1:] if isinstance(p, str) and p.isidentifier() and p not in TYPE_TAGS]
    return ".".join(fields) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = validation_param(tuple(first["loc"]))
        if first["type"] == "json_invalid":
            return error_response(400, "request body is not valid JSON", None, "invalid_json")
        message = FIELD_HINTS.get(param) or (f"{param}: {first['msg']}" if param else first["msg"])
        return error_response(400, message, param, first["type"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, None, getattr(exc, "headers", None))
