"""A live ``difftool serve`` app on loopback for tests (a free port, in a thread): plugin authors can test
their task through the HTTP API, and difftool's own server and GUI tests use it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def live_server(app: Any, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` (from :func:`difftool.serve.app.create_app`) with uvicorn on 127.0.0.1; yields
    ``host:port`` once it answers, and stops it (lifespan shutdown included) after the block."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
