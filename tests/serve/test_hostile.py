"""Hardening, round three (issue 29): what a hostile client sent to ``difftool serve``, each answered with a
one-line 4xx before any work is queued (docs/reliability.md, "Hardening, round three")."""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from serve_helpers import b64, png_bytes

from difftool.core.errors import ParameterError
from difftool.plugins.registry import Registry
from difftool.serve.settings import ServeSettings

GENERATE = {"task": "generate", "model": "tiny-sd", "params": {"prompt": "x", "steps": 1, "width": 16, "height": 16}}


def _error(response: Any, status: int | tuple[int, ...]) -> str:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"], body
    return body["error"]


def test_a_huge_prompt_is_refused_before_it_is_queued(make_client: Any, model_root: Path) -> None:
    client = make_client(start_workers=False)
    ten_mb = {**GENERATE, "params": {**GENERATE["params"], "prompt": "a cat, " * 1_500_000}}
    assert "over its limit of 20000" in _error(client.post("/v1/jobs", json=ten_mb), 422)
    many_tokens = {**GENERATE, "params": {**GENERATE["params"], "negative_prompt": "cat, " * 1500}}
    assert "chunks of 75 tokens, over the limit of 16" in _error(client.post("/v1/jobs", json=many_tokens), 422)
    assert client.app.state.server.queue.waiting() == 0  # nothing was queued
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "x" * 30_000, "steps": 1, "width": 16, "height": 16})
    assert "--prompt is 30000 characters long" in _error(a1111, 422)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("param", ["vae", "embedding", "lora", "control"])
def test_a_fifo_named_by_a_request_is_refused_at_once(
    make_client: Any, model_root: Path, tmp_path: Path, param: str
) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    os.mkfifo(allowed / "pipe.safetensors")
    client = make_client(allow_paths=(allowed,), start_workers=False)
    value: Any = str(allowed / "pipe.safetensors")
    if param == "control":
        value = [{"model": "cn-tiny", "image": {"path": value}}]
    body = {**GENERATE, "model": "tiny-sd8", "params": {**GENERATE["params"], param: value}}
    assert "not a regular file" in _error(client.post("/v1/jobs", json=body), 422)
    model = client.post("/v1/jobs", json={**GENERATE, "model": str(allowed / "pipe.safetensors")})
    assert "not a regular file" in _error(model, 422)


def test_a_fifo_model_file_is_refused_on_the_command_line_too(tmp_path: Path) -> None:
    from difftool.core.errors import ModelError
    from difftool.core.safetensors_check import check_safetensors

    os.mkfifo(tmp_path / "vae.safetensors")
    with pytest.raises(ModelError, match="not a regular file"):
        check_safetensors(tmp_path / "vae.safetensors")  # returns at once: nothing opened the pipe


def _flat_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def test_the_pixel_budget_is_checked_from_the_header_and_the_work_before_queueing(
    make_client: Any, model_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(start_workers=False, max_pixels=64 * 64, default_model="tiny-sd")
    big = _flat_png(65, 64)  # a few hundred bytes
    assert len(big) < 1000
    # Decoding is never reached: Pillow's decoder would count the image.
    import PIL.ImageFile

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a refused image"))
    for response in (
        client.post("/v1/jobs", json={"task": "superres", "inputs": [b64(big)]}),
        client.post("/v1/jobs", files={"image": ("a.png", big)}, data={"task": "superres"}),
        client.post("/sdapi/v1/img2img", json={"init_images": [b64(big)], "prompt": "x", "width": 16, "height": 16}),
        client.post("/sdapi/v1/extra-single-image", json={"image": b64(big), "upscaler_1": "difftool"}),
    ):
        assert "--max-pixels" in _error(response, 413)
    monkeypatch.undo()
    # Small inputs, but the outputs asked for are over the budget: refused before queueing.
    small = b64(png_bytes(20, 16))
    superres = client.post("/v1/jobs", json={"task": "superres", "inputs": [small], "params": {"scale": 8}})
    assert "the superres output is 160x128" in _error(superres, 413)
    generate = {**GENERATE, "params": {**GENERATE["params"], "width": 64, "height": 64}, "count": 5}
    assert "5 outputs of 64x64" in _error(client.post("/v1/jobs", json=generate), 413)
    hires = {**GENERATE, "params": {**GENERATE["params"], "width": 64, "height": 64, "hires": 2.0}}
    assert "the generate output is 128x128" in _error(client.post("/v1/jobs", json=hires), 413)
    assert client.app.state.server.queue.waiting() == 0
    ok = client.post("/v1/jobs", json={**GENERATE, "count": 4, "params": {**GENERATE["params"], "width": 64}})
    assert ok.status_code == 202, ok.text


@pytest.mark.parametrize(
    ("params", "flag"),
    [
        ({"guidance_scale": "NaN"}, "--guidance-scale"),
        ({"hires": float("nan")}, "--hires"),
        ({"hires": 2.0, "hires_strength": "nan"}, "--hires-strength"),
        ({"guidance_scale": "inf"}, "--guidance-scale"),
        ({"steps": 1e308}, "--steps"),
    ],
)
def test_nan_and_inf_are_refused_by_name(make_client: Any, model_root: Path, params: dict, flag: str) -> None:
    client = make_client(start_workers=False)
    body = {**GENERATE, "params": {**GENERATE["params"], **params}}
    content = json_with_nan(body)
    response = client.post("/v1/jobs", content=content, headers={"content-type": "application/json"})
    assert flag in _error(response, 422)


def json_with_nan(body: dict) -> bytes:
    import json

    return json.dumps(body, allow_nan=True).encode()  # NaN/Infinity literals, as JavaScript clients send


@pytest.mark.parametrize("field", ["cfg_scale", "denoising_strength"])
def test_a1111_nan_is_refused_before_any_work(make_client: Any, model_root: Path, field: str) -> None:
    client = make_client(default_model="tiny-sd")  # A1111 routes wait for their job: workers run
    body = {"init_images": [b64(png_bytes(16, 16))], "prompt": "x", "steps": 1, "width": 16, "height": 16}
    content = json_with_nan({**body, field: float("nan")})
    response = client.post("/sdapi/v1/img2img", content=content, headers={"content-type": "application/json"})
    assert field in _error(response, 422)
    assert not client.app.state.server.queue.jobs  # nothing was queued


@pytest.mark.parametrize(
    "header",
    [
        "Basic " + "é" * 8,  # non-ASCII
        "Basic " + base64.b64encode("user:ünïcode".encode()).decode(),
        "Basic %%%",
        "Bearer " + "ü" * 12,
    ],
)
def test_odd_authorization_headers_are_401_not_500(make_client: Any, header: str) -> None:
    client = make_client(api_token="s3cret-token-0123", start_workers=False)
    response = client.get("/v1/tasks", headers={"Authorization": header.encode("latin-1")})
    _error(response, 401)


@pytest.mark.parametrize(
    "token", ["        ", "   short   ", "with space inside", "tab\tinside-the-token", "ünicode-token-123"]
)
def test_blank_or_unsendable_tokens_are_refused(token: str) -> None:
    with pytest.raises(ParameterError, match="--api-token"):
        ServeSettings(api_token=token).check()


def test_bracketed_ipv6_hosts_are_refused_in_one_line() -> None:
    with pytest.raises(ParameterError, match="without brackets"):
        ServeSettings(host="[::1]").check()


def test_result_folders_of_killed_servers_are_removed_only_when_provably_ours(tmp_path: Path) -> None:
    """Issue 29 item 12: a SIGKILLed server's folder is removed by the next start; nothing else is."""
    import multiprocessing
    import signal

    from difftool.serve.results import RESULTS_MARKER, make_results_dir, remove_orphaned_results

    def serve_then_hang(root: str, ready: Any) -> None:
        folder, _ = make_results_dir(root)
        (folder / "job-0-0.png").write_bytes(b"result")
        ready.put(str(folder))
        time.sleep(600)

    context = multiprocessing.get_context("fork")
    ready = context.Queue()
    killed = context.Process(target=serve_then_hang, args=(str(tmp_path), ready))
    killed.start()
    dead_folder = Path(ready.get(timeout=30))
    alive_folder, marker = make_results_dir(str(tmp_path))  # this process: alive, holds its lock
    users = tmp_path / "difftool-serve-mine"  # the name, but no marker: a user's folder
    users.mkdir()
    (users / "photo.png").write_bytes(b"keep")
    forged = tmp_path / "difftool-serve-forged"  # a marker without the magic line
    forged.mkdir()
    (forged / RESULTS_MARKER).write_bytes(b"something else\n")
    linked = tmp_path / "difftool-serve-link"
    linked.symlink_to(users)
    try:
        assert remove_orphaned_results(str(tmp_path)) == []  # the killed one is still alive here
        os.kill(killed.pid, signal.SIGKILL)
        killed.join(30)
        assert remove_orphaned_results(str(tmp_path)) == [dead_folder]
        assert not dead_folder.exists()
        assert alive_folder.exists() and (users / "photo.png").exists() and forged.exists() and linked.is_symlink()
    finally:
        os.close(marker)
        if killed.is_alive():
            killed.kill()


def test_errors_never_show_the_servers_paths(make_client: Any, model_root: Path, tmp_path: Path) -> None:
    """Issue 29 item 11: errors named the model roots and the --allow-path folder's absolute path."""
    from serve_helpers import wait_for

    allowed = tmp_path / "allowed"
    (allowed / "not-a-model").mkdir(parents=True)
    (allowed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    client = make_client(allow_paths=(allowed,))
    texts = []
    job = client.post("/v1/jobs", json={**GENERATE, "model": "not-a-model"})
    texts.append(job.text)
    if job.status_code == 202:
        texts.append(json_text(wait_for(client, job.json()["id"])))
    texts.append(client.post("/v1/jobs", json={"task": "superres", "inputs": [{"path": "broken.png"}]}).text)
    for text in texts:
        assert "error" in text and str(tmp_path) not in text and str(model_root) not in text, text


def json_text(value: Any) -> str:
    import json

    return json.dumps(value)


def test_an_unknown_model_name_is_422_on_an_allow_path_server_too(
    make_client: Any, model_root: Path, tmp_path: Path
) -> None:
    """Issue 29 item 10: was 403 'does not exist inside an allowed folder'."""
    client = make_client(allow_paths=(tmp_path,), start_workers=False)
    for params in ({"control": [{"model": "no-such-cn"}]}, {"hires": 2.0, "hires_upscaler": "no-such-upscaler"}):
        body = {**GENERATE, "params": {**GENERATE["params"], **params}}
        assert "not one of this server's models" in _error(client.post("/v1/jobs", json=body), 422)
    response = client.post("/v1/jobs", json={**GENERATE, "model": "sub/missing.safetensors"})
    assert "does not exist inside an allowed folder" in _error(response, 403)  # a path stays a path


def test_a1111_unknown_fields_are_refused_and_extras_scales_work(make_client: Any, model_root: Path) -> None:
    """Issue 29 item 10: unknown fields were silently accepted; extras 1, 3 and 8 failed with 'no variant'."""
    client = make_client(default_model="tiny-sd")
    body = {"prompt": "x", "steps": 1, "width": 16, "height": 16, "outpath_samples": "/tmp"}
    assert "outpath_samples" in _error(client.post("/sdapi/v1/txt2img", json=body), 422)
    extra = {"image": b64(png_bytes(12, 8)), "upscaler_1": "difftool", "upscaling_resize": 2, "anything": 1}
    assert "anything" in _error(client.post("/sdapi/v1/extra-single-image", json=extra), 422)
    del extra["anything"]
    for scale in (1, 3, 8):
        response = client.post("/sdapi/v1/extra-single-image", json={**extra, "upscaling_resize": scale})
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["image"])))
        assert image.size == (12 * scale, 8 * scale)


def test_the_http_surface_says_what_it_does(make_client: Any) -> None:
    """Issue 29 item 9: HEAD was 405, guard answers had no CORS headers, the OpenAPI document promised FastAPI's
    {"detail": [...]} errors and JSON events."""
    client = make_client(start_workers=False, api_token="s3cret-token-0123", cors_origins=("https://app.example",))
    auth = {"Authorization": "Bearer s3cret-token-0123"}
    head = client.head("/v1/tasks", headers=auth)
    assert head.status_code == 200 and head.content == b""
    refused = client.get("/v1/tasks", headers={"Origin": "https://app.example"})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://app.example"
    document = client.get("/openapi.json", headers=auth).json()
    assert "HTTPValidationError" not in json_text(document)
    create = document["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"401", "403", "413", "422", "429", "503"} <= set(create)
    assert create["422"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/Error"
    events = document["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert set(events) == {"text/event-stream"}


def test_a_client_that_never_finishes_its_headers_is_disconnected(serve_registry: Registry) -> None:
    """Issue 29 item 8: 500 half-open connections stayed open (uvicorn has no header timeout)."""
    import socket
    import threading

    import uvicorn

    from difftool.serve.app import create_app, uvicorn_config

    settings = ServeSettings(header_timeout=0.5)
    app = create_app(settings, serve_registry, start_workers=False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        port = listener.getsockname()[1]
        slow, idle = (socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2))
        slow.sendall(b"GET /v1/tasks HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        for _ in range(3):  # trickling bytes does not keep it open
            time.sleep(0.2)
            slow.sendall(b"X-A: b\r\n")
        good = socket.create_connection(("127.0.0.1", port), timeout=10)  # a prompt client is served
        good.sendall(b"GET /v1/schedulers HTTP/1.1\r\nHost: x\r\n\r\n")
        assert good.recv(100).startswith(b"HTTP/1.1 200")
        time.sleep(1.0)
        assert slow.recv(100) == b"" and idle.recv(100) == b""  # closed by the server
    finally:
        server.should_exit = True
        thread.join(30)
        listener.close()


def test_a_chunked_body_over_the_limit_is_413_on_a1111_routes_too(make_client: Any) -> None:
    """Issue 29 item 9: FastAPI answered the guard's refusal, raised while it read the body, with a 400."""
    client = make_client(max_body_bytes=4096, start_workers=False)

    def chunks() -> Any:  # no Content-Length: counted as it streams
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"A" * 1000
        yield b'"}'

    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/extra-single-image", "/v1/jobs"):
        response = client.post(path, content=chunks(), headers={"content-type": "application/json"})
        assert "larger than 4096 bytes" in _error(response, 413)
