"""``difftool serve --ray``: the same application on a local Ray Serve with 2 replicas, on loopback.

Same pixels as ``difftool.run`` through the real ``webuiapi`` client; ``/v1/jobs`` created on one replica
and read, cancelled and fetched on the other; a replica killed in the middle of a request.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from serve_helpers import b64, png_bytes, wait_http

import difftool

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
webuiapi = pytest.importorskip("webuiapi")
pytestmark = pytest.mark.slow

HEADER = "X-Difftool-Replica"
ORIGIN = "http://studio.example"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(model_root: Any) -> Iterator[str]:
    """Two HTTP replicas and two model replicas (half a CPU each) of the built-in tasks, the tiny SD models
    in the model root; module-scoped, so Ray starts before the per-test loopback guard (Ray looks up this
    machine's address once, at start)."""
    from difftool.app.executors.ray_data import start_ray
    from difftool.serve.ray_serve import RayOptions, deploy, undeploy
    from difftool.serve.settings import ServeSettings

    start_ray()
    options = RayOptions(replicas=2, cpus_per_replica=0.5, plugins=(), stale_after=8.0)
    settings = ServeSettings(
        port=_free_port(), default_model="tiny-sd", cors_origins=(ORIGIN,), max_body_bytes=1024 * 1024
    )
    base = deploy(settings, options)
    deadline = time.monotonic() + 120
    seen: set[str] = set()
    while len(seen) < 2:  # both replicas up and answering
        assert time.monotonic() < deadline, f"the replicas did not come up (answered: {seen})"
        try:
            seen.add(requests.get(f"{base}/v1/backends", timeout=5).headers[HEADER])
        except (requests.RequestException, KeyError):
            time.sleep(0.2)
    yield base
    undeploy(options)
    serve.shutdown()
    ray.shutdown()


def _on_another_replica(url: str, replica: str, method: str = "get", tries: int = 40) -> requests.Response:
    """Send the request until a replica other than ``replica`` answers it."""
    for _ in range(tries):
        response = requests.request(method, url, timeout=30)
        if response.headers.get(HEADER) != replica:
            return response
    raise AssertionError(f"{tries} requests all went to {replica}")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_webuiapi_upscale_gives_the_same_pixels_as_difftool_run(ray_server: str) -> None:
    host, port = ray_server.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    small = Image.open(io.BytesIO(png_bytes(16, 12, seed=3)))
    for _ in range(2):  # twice: whichever replicas answer, the same pixels
        result = api.extra_single_image(image=small, upscaler_1="difftool", upscaling_resize=2)
        record = json.loads(result.image.info["difftool"])
        assert result.image.size == (32, 24) and record["scale"] == 2
        expected = difftool.run("superres", small, scale=2, seed=record["seed"])
        assert np.array_equal(pixels(result.image), pixels(expected.image))
    # The A1111 options live on the board: set through one replica, read through the other.
    response = requests.post(f"{ray_server}/sdapi/v1/options", json={"show_progress_every_n_steps": 3}, timeout=10)
    assert response.status_code == 200
    other = _on_another_replica(f"{ray_server}/sdapi/v1/options", response.headers[HEADER])
    assert other.json()["show_progress_every_n_steps"] == 3
    requests.post(f"{ray_server}/sdapi/v1/options", json={"show_progress_every_n_steps": 0}, timeout=10)


def test_the_replicas_keep_the_servers_limits_and_cors(ray_server: str) -> None:
    big = requests.post(f"{ray_server}/v1/jobs", data=b"x" * (2 * 1024 * 1024), timeout=30)
    assert big.status_code == 413 and "larger than 1048576 bytes" in big.json()["error"] and big.headers[HEADER]
    headers = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    allowed = requests.options(f"{ray_server}/v1/jobs", headers=headers, timeout=10)
    assert allowed.headers.get("access-control-allow-origin") == ORIGIN
    other = requests.options(f"{ray_server}/v1/jobs", headers={**headers, "Origin": "http://elsewhere"}, timeout=10)
    assert "access-control-allow-origin" not in other.headers


def test_a_job_posted_on_one_replica_is_read_cancelled_and_fetched_on_another(ray_server: str) -> None:
    body = {"task": "superres", "inputs": [b64(png_bytes(12, 8, seed=1))], "params": {"scale": 2}, "seed": 7}
    posted = requests.post(f"{ray_server}/v1/jobs", json=body, timeout=30)
    assert posted.status_code == 202
    job, creator = posted.json(), posted.headers[HEADER]
    status = _on_another_replica(f"{ray_server}/v1/jobs/{job['id']}", creator)
    assert status.status_code == 200 and status.json()["id"] == job["id"]
    assert wait_http(ray_server, job["id"])["state"] == "done"
    result = _on_another_replica(f"{ray_server}/v1/jobs/{job['id']}/result", creator)
    assert result.status_code == 200 and result.headers["content-type"] == "image/png"
    expected = difftool.run("superres", Image.open(io.BytesIO(png_bytes(12, 8, seed=1))), scale=2, seed=7)
    assert np.array_equal(pixels(Image.open(io.BytesIO(result.content))), pixels(expected.image))
    events = _on_another_replica(f"{ray_server}/v1/jobs/{job['id']}/events", creator)
    assert "event: done" in events.text

    # A long job, cancelled through the other replica: it stops within a step or so.
    long = {**body, "inputs": [b64(png_bytes(64, 48))], "params": {"scale": 2, "steps": 1000}}
    posted = requests.post(f"{ray_server}/v1/jobs", json=long, timeout=30)
    job_id, creator = posted.json()["id"], posted.headers[HEADER]
    deadline = time.monotonic() + 30
    while requests.get(f"{ray_server}/v1/jobs/{job_id}", timeout=10).json()["step"] < 1:
        assert time.monotonic() < deadline, "the long job did not start"
        time.sleep(0.05)
    # A1111's /progress sees the job from the other replica too.
    progress = _on_another_replica(f"{ray_server}/sdapi/v1/progress", creator).json()
    # (naming the task, never the job's id: issue 29 item 5)
    assert progress["state"]["job"] == "superres" and progress["state"]["sampling_step"] >= 1
    assert progress["progress"] > 0
    cancelled_at = time.monotonic()
    assert _on_another_replica(f"{ray_server}/v1/jobs/{job_id}", creator, method="delete").status_code == 200
    final = wait_http(ray_server, job_id, timeout=20)
    # Stopped by the cancel flag on the model replica, not by the 10 s abandon path.
    assert final["state"] == "cancelled" and final["error"] == "cancelled" and final["step"] < 1000
    assert time.monotonic() - cancelled_at < 5
    missing = requests.get(f"{ray_server}/v1/jobs/nope", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()


def _board_jobs(victim: str | None = None) -> list[dict[str, Any]]:
    """The queued and running jobs, straight from the board (of the HTTP replica ``victim`` only, if given)."""
    from difftool.serve.ray_serve import NAMESPACE, board_name

    board = ray.get_actor(board_name("difftool"), namespace=NAMESPACE)
    active = [e["status"] for e in ray.get(board.active.remote())]
    return [s for s in active if victim is None or s["replica"] == victim]


def _wait_for_replicas(deployment: str, count: int = 2) -> None:
    deadline = time.monotonic() + 60
    while True:
        replicas = serve.status().applications["difftool"].deployments[deployment].replica_states
        if replicas.get("RUNNING") == count and len(replicas) == 1:
            return
        assert time.monotonic() < deadline, replicas
        time.sleep(0.5)


def test_a_killed_model_replica_is_retried_and_the_request_answered_with_the_same_pixels(
    ray_server: str, model_root: Any
) -> None:
    host, port = ray_server.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    answers: list[Any] = []
    thread = threading.Thread(target=lambda: answers.append(
        api.txt2img(prompt="a red cube", seed=3, steps=60, width=32, height=32, sampler_name="Euler")))  # fmt: skip
    thread.start()
    deadline = time.monotonic() + 60
    while not (running := [s for s in _board_jobs() if s["task"] == "generate" and s["step"] >= 3]):
        assert time.monotonic() < deadline, "the txt2img request did not start"
        time.sleep(0.05)
    victim = running[0]["model_replica"]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    thread.join(120)
    assert len(answers) == 1  # answered, not failed: the run was sent again to the other model replica
    expected = difftool.run(
        "generate", model="tiny-sd", prompt="a red cube", seed=3, steps=60, width=32, height=32, scheduler="euler"
    )
    assert np.array_equal(pixels(answers[0].image), pixels(expected.image))
    record = answers[0].image.info["difftool"]
    assert "tiny-sd" in record and str(model_root) not in record  # the model by name, no server path
    status = requests.get(f"{ray_server}/v1/jobs/{running[0]['id']}", timeout=10).json()
    assert status["state"] == "done" and status["model_replica"] != victim
    _wait_for_replicas("DifftoolWorker")  # Ray Serve replaced the dead replica


def test_a_killed_http_replica_fails_its_requests_clearly_and_the_service_keeps_answering(ray_server: str) -> None:
    # Both model replicas busy with long jobs; A1111 requests wait on the HTTP replicas meanwhile.
    long = {"task": "superres", "inputs": [b64(png_bytes(64, 48))], "params": {"scale": 2, "steps": 1000}, "seed": 1}
    jobs = [requests.post(f"{ray_server}/v1/jobs", json=long, timeout=30).json()["id"] for _ in range(2)]
    deadline = time.monotonic() + 30
    while len([s for s in _board_jobs() if s["id"] in jobs and s["model_replica"] and s["step"] >= 1]) < 2:
        assert time.monotonic() < deadline, "the long jobs did not start"
        time.sleep(0.05)
    answers: list[requests.Response] = []
    image = b64(png_bytes(32, 24, seed=2))

    def upscale() -> None:
        body = {"image": image, "upscaler_1": "difftool", "upscaling_resize": 2}
        answers.append(requests.post(f"{ray_server}/sdapi/v1/extra-single-image", json=body, timeout=120))

    clients = [threading.Thread(target=upscale) for _ in range(4)]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 30
    while len(held := [s for s in _board_jobs() if s["id"] not in jobs]) < 4:
        assert time.monotonic() < deadline, f"the A1111 requests did not reach the HTTP replicas: {held}"
        time.sleep(0.05)
    victim = held[0]["replica"]
    lost = [s["id"] for s in _board_jobs(victim)]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for job_id in jobs:  # let the model replicas go (a long job the victim held is stopped by the board)
        requests.delete(f"{ray_server}/v1/jobs/{job_id}", timeout=10)
    for client in clients:
        client.join(120)
    assert len(answers) == 4
    failed = [a for a in answers if a.status_code != 200]
    # The requests the victim held fail at once with Ray Serve's own error (the proxy answers: difftool's process
    # is gone); the others are answered in full by the surviving HTTP replica.
    assert failed and all(a.status_code == 500 for a in failed), [(a.status_code, a.text[:200]) for a in answers]
    for answer in answers:
        if answer.status_code == 200:
            assert answer.headers[HEADER] != victim
            assert Image.open(io.BytesIO(base64.b64decode(answer.json()["image"]))).size == (64, 48)
    # The jobs the dead replica held end failed with a clear error, on whichever replica is asked.
    for job_id in lost:
        status = wait_http(ray_server, job_id, timeout=30)
        assert status["state"] == "failed" and status["error_type"] == "ReplicaLost", status
        assert "submit the job again" in status["error"]
    # The service keeps answering, and Ray Serve brings the HTTP replicas back to 2.
    for seed in range(4):
        body = {"task": "superres", "inputs": [b64(png_bytes(12, 8))], "params": {"scale": 2}, "seed": seed}
        posted = requests.post(f"{ray_server}/v1/jobs", json=body, timeout=60)
        assert posted.status_code == 202 and wait_http(ray_server, posted.json()["id"])["state"] == "done"
    _wait_for_replicas("DifftoolReplica")
