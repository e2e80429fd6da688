"""Helpers shared by the server tests (a module, not the conftest: ``tests/conftest.py`` has that name too)."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import numpy as np
from PIL import Image


def png_bytes(width: int = 20, height: int = 16, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def wait_for(client: Any, job_id: str, timeout: float = 60.0, base: str = "") -> dict[str, Any]:
    """Poll ``GET {base}/v1/jobs/{id}`` with ``client`` (a TestClient, or ``requests``) until the job ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def wait_http(base: str, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """:func:`wait_for` over real HTTP, on a live server at ``base``."""
    import requests

    return wait_for(requests, job_id, timeout, base)
