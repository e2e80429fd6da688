"""Under load and faults: concurrent clients all answered once, a vanished client's job cancelled, SIGTERM."""

from __future__ import annotations

import gc
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image
from serve_helpers import b64, png_bytes


def test_concurrent_clients_are_all_answered_once(live_server: str) -> None:
    """40 small superres requests from 8 clients (after a warm-up round of 8): each answered once with its own
    seed, none lost or duplicated, and memory does not grow more than 10% after the warm-up."""
    base = f"http://{live_server}"
    image = b64(png_bytes(12, 8))
    answers: list[tuple[int, str, int, tuple[int, int]]] = []

    def client(worker: int, count: int, first_seed: int) -> None:
        with requests.Session() as session:
            for n in range(count):
                seed = first_seed + worker * 100 + n
                body = {"task": "superres", "inputs": [image], "params": {"scale": 2, "steps": 1}, "seed": seed}
                job = session.post(f"{base}/v1/jobs", json=body, timeout=30).json()
                with session.get(f"{base}/v1/jobs/{job['id']}/events", stream=True, timeout=60) as events:
                    kinds = [line for line in events.iter_lines(decode_unicode=True) if line.startswith("event:")]
                assert kinds[-1] == "event: done", kinds
                png = session.get(f"{base}/v1/jobs/{job['id']}/result", timeout=30)
                result = Image.open(io.BytesIO(png.content))
                answers.append((seed, job["id"], json.loads(result.text["difftool"])["seed"], result.size))

    rss = []
    for count, first_seed in ((1, 0), (5, 10_000)):  # warm-up (model loaded, pools grown), then the load
        answers.clear()
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(client, range(8), [count] * 8, [first_seed] * 8))
        assert len(answers) == 8 * count and len({job_id for _, job_id, _, _ in answers}) == 8 * count
        assert sorted(asked for asked, *_ in answers) == sorted(
            first_seed + w * 100 + n for w in range(8) for n in range(count)
        )
        assert all(asked == made and size == (24, 16) for asked, _, made, size in answers)
        assert time.monotonic() - started < 60
        gc.collect()
        rss.append(_rss_mib())
    assert rss[1] < rss[0] * 1.10, f"RSS grew from {rss[0]:.0f} to {rss[1]:.0f} MiB"


def _rss_mib() -> float:
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("RSS is read from /proc")
    line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def test_a_client_that_disconnects_cancels_its_job(live_server: str) -> None:
    base = f"http://{live_server}"
    outcome: list[BaseException] = []

    def impatient_client() -> None:  # gives up after 2 s and closes the connection
        body = {"prompt": "x", "seed": 1, "steps": 500, "width": 64, "height": 64, "sampler_name": "Euler"}
        try:
            requests.post(f"{base}/sdapi/v1/txt2img", json=body, timeout=2)
        except requests.exceptions.ReadTimeout as error:
            outcome.append(error)

    thread = threading.Thread(target=impatient_client)
    thread.start()
    deadline = time.monotonic() + 30
    while not requests.get(f"{base}/sdapi/v1/progress", timeout=10).json()["state"]["sampling_step"]:
        assert time.monotonic() < deadline and thread.is_alive(), "the job was never seen running"
        time.sleep(0.02)
    thread.join(30)
    assert outcome, "the request should still have been running when the client gave up"
    deadline = time.monotonic() + 30  # cancelled: the server is idle long before 500 steps could end
    while (progress := requests.get(f"{base}/sdapi/v1/progress", timeout=10).json())["state"]["sampling_steps"]:
        assert time.monotonic() < deadline, f"the job was not cancelled: {progress}"
        time.sleep(0.05)
    assert progress["state"]["job_count"] == 0


def _wait_started(base: str, server: subprocess.Popen) -> float:
    """Wait until the server at ``base`` answers; returns the deadline (60 s from now) for later waits."""
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(f"{base}/v1/tasks", timeout=5)
            return deadline
        except requests.ConnectionError:
            assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
            time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_sigterm_stops_cleanly(model_root: Path, tmp_path: Path) -> None:
    """SIGTERM: the running job is cancelled after the grace period, the process ends, its outputs folder goes."""
    port = _free_port()
    env = {**os.environ, "DIFFTOOL_MODELS": str(model_root), "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "difftool", "serve", "--port", str(port), "--shutdown-timeout", "1"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_started(base, server)
        body = {"task": "generate", "model": "tiny-sd", "seed": 1,
                "params": {"prompt": "x", "steps": 500, "width": 16, "height": 16}}  # fmt: skip
        job = requests.post(f"{base}/v1/jobs", json=body, timeout=30).json()
        while requests.get(f"{base}/v1/jobs/{job['id']}", timeout=10).json()["step"] < 1:
            time.sleep(0.02)
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    # uvicorn re-raises the signal once shut down (exit status -15), as a process killed by it should
    assert server.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output and "Traceback" not in output
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base}/v1/tasks", timeout=5)
    assert not list(tmp_path.glob("difftool-serve-*")), "the outputs folder is removed"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_sigterm_answers_waiting_clients_in_json_within_the_timeout(model_root: Path, tmp_path: Path) -> None:
    """Issue 29 item 4: a queued A1111 request and a running one are answered 503 (JSON, Retry-After), not a
    plain-text 500, and the process ends within --shutdown-timeout (plus the cancel's grace)."""
    port, timeout = _free_port(), 4
    env = {**os.environ, "DIFFTOOL_MODELS": str(model_root), "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "difftool", "serve", "--port", str(port), "--shutdown-timeout", str(timeout),
               "--model", "tiny-sd"]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    answers: dict[str, requests.Response] = {}

    def client(name: str) -> None:
        body = {"prompt": name, "seed": 1, "steps": 500, "width": 64, "height": 64, "sampler_name": "Euler"}
        answers[name] = requests.post(f"{base}/sdapi/v1/txt2img", json=body, timeout=120)

    try:
        deadline = _wait_started(base, server)
        threads = [threading.Thread(target=client, args=(name,)) for name in ("running", "queued")]
        threads[0].start()
        while not requests.get(f"{base}/sdapi/v1/progress", timeout=10).json()["state"]["sampling_step"]:
            assert time.monotonic() < deadline, "the first job never ran"
            time.sleep(0.02)
        threads[1].start()
        while requests.get(f"{base}/sdapi/v1/progress", timeout=10).json()["state"]["job_count"] < 2:
            time.sleep(0.02)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=60)
        took = time.monotonic() - signalled
        for thread in threads:
            thread.join(30)
    finally:
        if server.poll() is None:
            server.kill()
    assert took < timeout + 3, f"shutdown took {took:.1f} s against --shutdown-timeout {timeout}"
    for name in ("running", "queued"):
        response = answers[name]
        assert response.status_code == 503, (name, response.status_code, response.text)
        assert "shut down" in response.json()["error"] and response.headers["Retry-After"] == "30"
    assert "Traceback" not in output and "Cancel" not in output, output  # uvicorn cancelled no request
    assert not list(tmp_path.glob("difftool-serve-*")), "the outputs folder is removed"
