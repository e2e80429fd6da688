"""The FastAPI application: middleware (auth, body limit, CORS), JSON errors, the two route sets."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from difftool import __version__
from difftool.core.errors import (
    Cancelled,
    DifftoolError,
    ImageTooLargeError,
    OutputError,
    PluginError,
)
from difftool.core.task import RegistryView
from difftool.serve.errors import body_error, without_paths
from difftool.serve.job_queue import QueueFull
from difftool.serve.security import AccessDenied, token_matches
from difftool.serve.server import Server
from difftool.serve.settings import ServeSettings

log = logging.getLogger("difftool.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLarge(StarletteHTTPException):
    """The request body is over the server's limit (HTTP 413). An HTTP exception, not a difftool error: FastAPI
    passes those through while it reads a body, and answers anything else raised there with a 400."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)


def status_for(error: DifftoolError) -> int:
    """The HTTP status of a difftool error: the caller's mistake (4xx) or the server's (5xx)."""
    if isinstance(getattr(error, "status", None), int):  # a job's failure, already classified
        return error.status  # type: ignore[attr-defined]
    for kind, status in (
        (QueueFull, 429),
        (AccessDenied, 403),
        (ImageTooLargeError, 413),
        (Cancelled, 409),
        (PluginError, 500),
        (OutputError, 500),
    ):
        if isinstance(error, kind):
            return status
    return 422


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class GuardMiddleware:
    """Every request: the bearer token (when set) and the body size limit, before any route runs."""

    def __init__(self, app: Any, token: str | None, max_body: int) -> None:
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and scope.get("method") == "HEAD":  # every GET route answers HEAD
            scope, send = {**scope, "method": "GET"}, _without_body(send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["type"] == "websocket":  # none is served today; a future one is guarded all the same
            if self.token is not None and not token_matches(headers.get("authorization"), self.token):
                return await send({"type": "websocket.close", "code": 1008})
            return await self.app(scope, receive, send)
        if self.token is not None and scope.get("method") != "OPTIONS":
            if not token_matches(headers.get("authorization"), self.token):
                response = error_response(
                    401,
                    "missing or wrong API token; send 'Authorization: Bearer TOKEN'",
                    {"WWW-Authenticate": "Bearer"},
                )
                return await response(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await error_response(413, self._too_large())(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise BodyTooLarge(self._too_large())
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_body} bytes; send smaller images"


def _without_body(send: Send) -> Send:
    """``send`` for a HEAD request: the GET's status and headers, no body."""

    async def head(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b"", "more_body": False}
            if getattr(head, "done", False):
                return
            head.done = True  # type: ignore[attr-defined]
        await send(message)

    return head


def create_app(settings: ServeSettings, registry: RegistryView | None = None, start_workers: bool = True) -> FastAPI:
    """The server application for ``settings`` (``registry``: tests pass their own)."""
    from difftool.serve import a1111, native

    server = Server(settings.check(), registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start_workers:
            server.queue.start()
        try:
            yield
        finally:
            server.queue.stop(settings.shutdown_timeout)

    app = FastAPI(
        title="difftool",
        version=__version__,
        description="Diffusion models on images: the native /v1 API (generated from task declarations) "
        "and the AUTOMATIC1111 /sdapi/v1 subset. See docs/serve.md.",
        lifespan=lifespan,
    )
    app.state.server = server

    @app.exception_handler(DifftoolError)
    async def difftool_error(request: Request, error: DifftoolError) -> JSONResponse:
        retry = getattr(error, "retry_after", None)
        headers = {"Retry-After": str(retry)} if retry is not None else None
        return error_response(status_for(error), without_paths(str(error)), headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400 and error.__cause__ is not None:  # FastAPI could not parse the body
            return error_response(422, body_error(error.__cause__))
        return error_response(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":  # FastAPI's "JSON decode error" at a byte offset
            where = first.get("loc", ("body", "?"))[-1]
            reason = first.get("ctx", {}).get("error", "invalid")
            return error_response(422, f"the request body is not valid JSON: {reason} at character {where}")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(422, f"{where or 'request'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(json.JSONDecodeError)
    async def json_error(request: Request, error: json.JSONDecodeError) -> JSONResponse:
        return error_response(422, body_error(error))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(error).__name__}); the server log has the details")

    app.include_router(native.router)
    app.include_router(a1111.router)
    native.add_task_schemas(app, server)
    app.add_middleware(GuardMiddleware, token=settings.api_token, max_body=settings.max_body_bytes)
    if settings.cors_origins:  # added last, so outermost: the guard's own answers (401, 413) carry CORS too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "HEAD", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


#: Share of ``--shutdown-timeout`` running jobs get on SIGTERM; the rest lets their cancel land and the
#: requests waiting for them be answered before the HTTP server stops waiting.
DRAIN_SHARE = 0.6


def run(app: FastAPI, settings: ServeSettings) -> None:
    """Serve ``app`` with uvicorn until SIGTERM/SIGINT, then drain within ``settings.shutdown_timeout``.

    uvicorn alone would wait for open requests (an A1111 client waiting for its job) for the whole timeout,
    cancel them with a plain-text 500, and only then tell the application (the queue) to stop: twice the
    timeout. Here the queue starts draining the moment the shutdown begins (:meth:`JobQueue.drain`).
    """
    import uvicorn

    queue = app.state.server.queue

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            queue.drain(settings.shutdown_timeout * DRAIN_SHARE)
            await super().shutdown(sockets)

    server = DrainingServer(uvicorn_config(app, settings))
    server.run()
    if not server.started:
        raise SystemExit(3)


def uvicorn_config(app: FastAPI, settings: ServeSettings) -> Any:
    """uvicorn's configuration for ``app``: the address, the graceful timeout, and a header timeout."""
    import h11
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        """uvicorn waits forever for a request's headers (its keep-alive timer runs only after a response, and
        every byte received cancels it): 500 half-open connections stayed open. Here a connection whose
        client has not finished a request's headers ``header_timeout`` seconds after connecting, or after
        the previous response, is closed."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(settings.header_timeout, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # no request under way
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_timer.cancel()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        http=HeaderTimeoutProtocol,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout)),
    )
