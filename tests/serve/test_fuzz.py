"""Issue 29, "also required": property tests over the request models and every task's declared parameters (no
input ever yields a 500 or a traceback), and a bounded load test mixing hostile requests with normal ones."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import b64, png_bytes

from difftool.plugins.registry import Registry
from difftool.serve.job_queue import QueueFull

#: Values a careless or hostile client sends for any field.
HOSTILE = st.one_of(
    st.sampled_from(
        [float("nan"), float("inf"), -float("inf"), 2**64, -(2**63) - 1, -1, 0, 1e308, "", "\x00", "nan", True, None]
    ),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.text(alphabet="\x00/.:,=()\\\n<>ü", max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@pytest.fixture
def fuzz_client(make_client: Any, model_root: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A client whose server checks every request fully but never runs one: a request that passes every check
    is answered 429 (queue full) instead of being queued, so A1111 routes do not wait for a job."""
    from difftool.serve.server import Server

    def full(self: Any, job: Any) -> Any:
        raise QueueFull("the queue is full (fuzzing)", "retry later", retry_after=1)

    monkeypatch.setattr(Server, "submit", full)
    return make_client(start_workers=False, default_model="tiny-sd")


def _no_crash(response: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"], body


def _post(client: Any, path: str, body: Any) -> Any:
    content = json.dumps(body, allow_nan=True, default=str).encode()
    return client.post(path, content=content, headers={"content-type": "application/json"})


def _declared(registry: Registry) -> list[tuple[str, str]]:
    return [(name, p.name) for name in sorted(registry.tasks) for p in registry.task(name).params]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_native_request_is_a_500(fuzz_client: Any, data: st.DataObject) -> None:
    registry = fuzz_client.app.state.server.registry
    task, name = data.draw(st.sampled_from(_declared(registry)))
    body = {
        "task": task,
        "model": data.draw(st.sampled_from([None, "tiny-sd", "tiny-sd-inpaint", "nope", "../x", "a\x00b"])),
        "params": {name: data.draw(HOSTILE)},
        "inputs": data.draw(st.sampled_from([[], [b64(png_bytes(8, 8))], ["not base64!"], [{"path": "/etc"}]])),
    }
    if data.draw(st.booleans()):
        body[data.draw(st.sampled_from(["seed", "count", "dtype", "backend", "preview_every"]))] = data.draw(HOSTILE)
    _no_crash(_post(fuzz_client, "/v1/jobs", body))


A1111_FIELDS = {
    "/sdapi/v1/txt2img": ["prompt", "negative_prompt", "seed", "steps", "cfg_scale", "width", "height", "batch_size",
                          "n_iter", "sampler_name", "enable_hr", "hr_scale", "hr_upscaler", "denoising_strength",
                          "override_settings", "alwayson_scripts", "refiner_checkpoint", "refiner_switch_at"],
    "/sdapi/v1/img2img": ["init_images", "mask", "denoising_strength", "resize_mode", "mask_blur", "inpainting_fill",
                          "inpaint_full_res_padding", "inpainting_mask_invert", "cfg_scale", "include_init_images"],
    "/sdapi/v1/extra-single-image": ["image", "upscaling_resize", "upscaler_1", "resize_mode", "upscaler_2"],
}  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_a1111_request_is_a_500(fuzz_client: Any, data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(sorted(A1111_FIELDS)))
    image = b64(png_bytes(8, 8))
    base: dict[str, Any] = {
        "/sdapi/v1/img2img": {"init_images": [image], "prompt": "x", "width": 8, "height": 8},
        "/sdapi/v1/extra-single-image": {"image": image, "upscaler_1": "difftool"},
        "/sdapi/v1/txt2img": {"prompt": "x", "width": 8, "height": 8, "steps": 1},
    }[path]
    fields = data.draw(st.lists(st.sampled_from(A1111_FIELDS[path]), min_size=1, max_size=3, unique=True))
    body = {**base, **{name: data.draw(HOSTILE) for name in fields}}
    _no_crash(_post(fuzz_client, path, body))


@pytest.mark.parametrize(
    "content",
    [b"[" * 100_000, b'{"prompt": "\xff"}', b"{", b"null", b"[]", b'"text"', b"1e999", b'{"prompt": NaN}'],
)
def test_no_body_is_a_500(fuzz_client: Any, content: bytes) -> None:
    for path in ("/v1/jobs", *A1111_FIELDS, "/sdapi/v1/options"):
        _no_crash(fuzz_client.post(path, content=content, headers={"content-type": "application/json"}))


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def _flat_png(side: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_hostile_requests_mixed_with_normal_ones(live_server: str, tmp_path: Path) -> None:
    """Items 1-7 sent over and over on a live server while 12 ordinary superres requests run: every ordinary one
    is answered with its image, every hostile one with a 4xx at once, memory stays within 400 MB of the
    start and nothing is left running."""
    base = f"http://{live_server}"
    small = b64(png_bytes(12, 8))
    bomb = b64(_flat_png(9000))  # 81 MP under the default pixel limit, a few KB on the wire
    hostile = [
        ("/v1/jobs", {"task": "generate", "model": "tiny-sd", "params": {"prompt": "x" * 10_000_000}}),
        ("/v1/jobs", {"task": "superres", "inputs": [bomb]}),
        ("/sdapi/v1/img2img", {"init_images": [bomb], "prompt": "x"}),
        ("/v1/jobs", {"task": "generate", "model": "tiny-sd", "params": {"prompt": "x", "guidance_scale": math.nan}}),
        ("/v1/jobs", {"task": "generate", "model": "tiny-sd", "params": {"prompt": "x", "vae": "/dev/stdin"}}),
        ("/sdapi/v1/txt2img", {"prompt": "x", "seed": 2**64}),
        ("/v1/jobs", {"task": "generate", "model": "tiny\x00sd", "params": {"prompt": "x"}}),
    ]
    before = _rss_mb()
    answers: list[int] = []
    refusals: list[tuple[str, int, float]] = []
    stop = threading.Event()

    def attacker() -> None:
        while not stop.is_set():
            for path, body in hostile:
                started = time.monotonic()
                content = json.dumps(body, allow_nan=True).encode()
                response = requests.post(f"{base}{path}", data=content, timeout=60,
                                         headers={"content-type": "application/json"})  # fmt: skip
                refusals.append((path, response.status_code, time.monotonic() - started))

    def ordinary(seed: int) -> int:
        body = {"image": small, "upscaler_1": "difftool", "upscaling_resize": 2}
        response = requests.post(f"{base}/sdapi/v1/extra-single-image", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return seed

    attackers = [threading.Thread(target=attacker) for _ in range(2)]
    for thread in attackers:
        thread.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ordinary, range(12)))
    finally:
        stop.set()
        for thread in attackers:
            thread.join(120)
    grown = _rss_mb() - before
    assert sorted(answers) == list(range(12))
    assert refusals and all(400 <= status < 500 for _, status, _ in refusals), refusals
    assert max(seconds for _, _, seconds in refusals) < 30
    assert grown < 400, f"RSS grew {grown:.0f} MB"
    progress = requests.get(f"{base}/sdapi/v1/progress", timeout=10).json()
    assert progress["state"]["job_count"] == 0  # nothing left running or waiting
    print(f"load: {len(answers)} ordinary answered, {len(refusals)} hostile refused, RSS +{grown:.0f} MB")
