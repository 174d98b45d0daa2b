"""The one ASGI middleware around every route (pure ASGI: nothing buffers a stream).

For each HTTP request: a request id (echoed from `X-Request-Id` or made), the API key,
the body limit (Content-Length, and counted as it arrives for chunked bodies), 503 while
draining, a JSON 500 for anything unexpected, a bounded wait on each send (a client that
stops reading cannot hold its engine requests forever), the request metric, and the
request's cleanups (its admission slot) once the response is done or abandoned.
"""

import asyncio
import hmac
import logging
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, BodyTooLarge, error_json, shutting_down
from .lifecycle import Lifecycle
from .metrics import Metrics

log = logging.getLogger("tablefree.server")


class SendTimeout(Exception):
    pass


class Guard:
    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body: int, send_timeout: float,
                 open_paths: tuple[str, ...], lifecycle: Lifecycle, metrics: Metrics) -> None:
        self.app, self.api_key = app, api_key.encode() if api_key else None
        self.max_body, self.send_timeout, self.open_paths = max_body, send_timeout, open_paths
        self.lifecycle, self.metrics = lifecycle, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        api = not scope["path"].startswith(self.open_paths)
        cleanups: list[Callable[[], None]] = []
        scope.setdefault("state", {})["cleanups"] = cleanups
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = request_id
                await send(message)
                return
            try:
                await asyncio.wait_for(send(message), self.send_timeout)
            except asyncio.TimeoutError:
                raise SendTimeout(f"client read nothing for {self.send_timeout} s") from None

        counted = 0

        async def receive_limited() -> Message:
            nonlocal counted
            message = await receive()
            counted += len(message.get("body", b""))
            if counted > self.max_body:
                raise BodyTooLarge(self.max_body)
            return message

        admitted = False
        try:
            refusal = self.refusal(headers, api)
            if refusal is not None:
                return await self.respond(refusal, send_with_id)
            admitted = api
            self.lifecycle.in_flight += admitted
            await self.app(scope, receive_limited, send_with_id)
        except SendTimeout as err:
            log.warning("request %s: %s; its response is abandoned", request_id, err)
        except Exception:
            log.exception("request %s failed", request_id)
            if status is None:
                await self.respond(APIError(500, "internal server error; the request was not completed", None,
                                            "internal_error"), send_with_id)
        finally:
            self.lifecycle.in_flight -= admitted
            for cleanup in cleanups:
                cleanup()
            route = scope.get("route")
            self.metrics.requests.labels(route.path if route else "other", str(status or 500)).inc()

    def refusal(self, headers: Headers, api: bool) -> APIError | None:
        if api and self.api_key:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self.api_key):
                return APIError(401, "missing or wrong API key (Authorization: Bearer <key>)", None, "invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return BodyTooLarge(self.max_body).error
        if api and self.lifecycle.draining:
            return shutting_down()
        return None

    @staticmethod
    async def respond(error: APIError, send: Send) -> None:
        body = error_json(error)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
