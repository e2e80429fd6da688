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
from difftool.serve.jobs import QueueFull
from difftool.serve.security import AccessDenied, token_matches
from difftool.serve.server import Server
from difftool.serve.settings import ServeSettings

log = logging.getLogger("difftool.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLarge(DifftoolError):
    """The request body is over the server's limit (HTTP 413)."""


def status_for(error: DifftoolError) -> int:
    """The HTTP status of a difftool error: the caller's mistake (4xx) or the server's (5xx)."""
    if isinstance(getattr(error, "status", None), int):  # a job's failure, already classified
        return error.status  # type: ignore[attr-defined]
    for kind, status in (
        (QueueFull, 429),
        (AccessDenied, 403),
        (BodyTooLarge, 413),
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


def create_app(settings: ServeSettings, registry: Any = None, start_workers: bool = True) -> FastAPI:
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
        headers = {"Retry-After": str(error.retry_after)} if isinstance(error, QueueFull) else None
        return error_response(status_for(error), str(error), headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(422, f"{where or 'request'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(json.JSONDecodeError)
    async def json_error(request: Request, error: json.JSONDecodeError) -> JSONResponse:
        return error_response(422, f"the request body is not valid JSON: {error.msg}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(error).__name__}); the server log has the details")

    app.include_router(native.router)
    app.include_router(a1111.router)
    native.add_task_schemas(app, server)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(GuardMiddleware, token=settings.api_token, max_body=settings.max_body_bytes)
    return app
