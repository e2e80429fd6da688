"""The native ``/v1`` API: schemas from task declarations, jobs (JSON and multipart), events, cancel, errors."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image
from serve_helpers import b64, png_bytes, wait_for

import difftool
from difftool.core.images import read_metadata
from difftool.core.task import Param, RunContext, Task, TaskRequest, TaskResult
from difftool.plugins import hookimpl
from difftool.plugins.registry import Registry


class SlowSteps(Task):
    """A test task: ``steps`` progress steps of ``delay`` seconds, checking cancel before each, like the sampler."""

    name = "slow-steps"
    summary = "Count steps slowly (tests)"
    inputs = ()
    params = (
        Param("steps", "int", default=5, min=1, max=100_000),
        Param("delay", "float", default=0.01, min=0.0, max=1.0),
        Param("fail", "bool", default=False),
    )

    def run(self, request: TaskRequest, context: RunContext) -> TaskResult:
        total = request.params["steps"]
        for step in range(total):
            context.cancel.raise_if_cancelled()
            time.sleep(request.params["delay"])
            context.report(step + 1, total)
        if request.params["fail"]:
            raise RuntimeError("boom")
        return TaskResult([Image.new("RGB", (8, 8), (context.seed % 256, 0, 0))], {})


class Stuck(Task):
    """A test task that ignores cancel for ``seconds`` (a plugin hung outside the sampler)."""

    name = "stuck"
    summary = "Sleep without checking cancel (tests)"
    inputs = ()
    params = (Param("seconds", "float", default=3.0, min=0.0, max=60.0),)

    def run(self, request: TaskRequest, context: RunContext) -> TaskResult:
        context.report(1, 2)
        time.sleep(request.params["seconds"])
        return TaskResult([Image.new("RGB", (8, 8))], {})


class SlowPlugin:
    @staticmethod
    @hookimpl
    def register_tasks(register: Callable[[type[Task]], None]) -> None:
        register(SlowSteps)
        register(Stuck)


@pytest.fixture
def client(make_client: Any) -> Any:
    from difftool.plugins.registry import build_registry

    registry = build_registry(["difftool_plugin_example", SlowPlugin()], entry_points=False)
    return make_client(registry, abandon_after=0.3, shutdown_timeout=0.5)


def _json_type(param: Param) -> str | None:
    kinds = {"int": "integer", "float": "number", "bool": "boolean", "string": "string", "path": "string"}
    return {**kinds, "model": "string"}.get(param.type)


def test_task_schemas_match_the_declarations(client: Any, serve_registry: Registry) -> None:
    tasks = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}
    openapi = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"generate", "style", "inpaint", "superres", "posterize", "slow-steps"} <= set(tasks)
    assert tasks["posterize"]["plugin"] == "difftool_plugin_example"
    for name, described in tasks.items():
        task = (
            serve_registry.task(name)
            if name in serve_registry.tasks
            else {"slow-steps": SlowSteps, "stuck": Stuck}[name]()
        )
        schema = described["params"]
        assert openapi[f"{name}Params"] == schema  # the OpenAPI document publishes the same schema
        assert list(schema["properties"]) == [p.name for p in task.params]
        assert schema["required"] == [p.name for p in task.params if p.required]
        assert [i["name"] for i in described["inputs"]] == [p.name for p in task.inputs]
        for param in task.params:
            prop = schema["properties"][param.name]
            if param.multiple:  # an array of the declared type (--control: or objects)
                assert prop["type"] == "array"
                prop = {**prop["items"].get("anyOf", [prop["items"]])[0], "default": prop.get("default")}
            assert prop.get("type") == _json_type(param) or param.type in ("choice", "image", "mask")
            assert prop.get("minimum") == param.min and prop.get("maximum") == param.max
            assert prop.get("default") == param.default
            if param.type == "choice" and param.choices:
                assert prop["enum"] == list(param.choices)
            if param.type == "model":  # what a remote GUI's model picker offers
                assert prop["x-difftool-type"] == "model" and prop["x-difftool-families"] == list(param.families)
                assert prop["x-difftool-keywords"] == list(param.keywords)
    levels = tasks["posterize"]["params"]["properties"]["levels"]
    assert levels == {"type": "integer", "minimum": 2, "maximum": 64, "default": 4, "description": "levels per channel"}
    # choices_from="schedulers": the plugin's scheduler is a valid choice of every scheduler parameter
    assert "ddim-trailing" in tasks["generate"]["params"]["properties"]["scheduler"]["enum"]
    assert openapi["JobRequest"]["properties"]["count"]["maximum"] == 16


def test_listings(client: Any, model_root: Any) -> None:
    models = client.get("/v1/models").json()["models"]
    assert {"name": "tiny-sd", "family": "sd1"} in models and all(set(m) == {"name", "family"} for m in models)
    schedulers = {s["name"]: s for s in client.get("/v1/schedulers").json()["schedulers"]}
    assert schedulers["ddim-trailing"]["plugin"] == "difftool_plugin_example"
    backends = {b["name"]: b for b in client.get("/v1/backends").json()["backends"]}
    assert backends["torch"]["devices"] == {"cpu": "ready"}


def test_json_job_gives_the_cli_png_and_pixels(client: Any, serve_registry: Registry) -> None:
    data = png_bytes(16, 12)
    response = client.post(
        "/v1/jobs", json={"task": "superres", "inputs": [b64(data)], "params": {"scale": 2}, "seed": 3}
    )
    assert response.status_code == 202 and response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    status = wait_for(client, response.json()["id"])
    assert status["state"] == "done" and status["progress"] == 1.0 and status["seeds"] == [3]
    result = client.get(f"/v1/jobs/{status['id']}/result")
    assert result.status_code == 200 and result.headers["content-type"] == "image/png"
    expected = difftool.run("superres", data, scale=2, seed=3, registry=serve_registry)
    image = Image.open(io.BytesIO(result.content))
    assert np.array_equal(np.asarray(image), np.asarray(expected.image))
    meta = read_metadata(image)
    assert meta["difftool"] == json.loads(json.dumps(expected.record, default=str))
    assert meta["parameters"]["Seed"] == "3" and meta["parameters"]["Upscale"] == "2"


def test_multipart_job_and_server_sent_events(client: Any) -> None:
    response = client.post(
        "/v1/jobs",
        data={"task": "posterize", "params": json.dumps({"levels": 2}), "seed": "1"},
        files={"image": ("in.png", png_bytes(), "image/png")},
    )
    assert response.status_code == 202, response.text
    status = wait_for(client, response.json()["id"])
    image = np.asarray(Image.open(io.BytesIO(client.get(f"/v1/jobs/{status['id']}/result").content)))
    assert set(np.unique(image)) <= {0, 255}  # 2 levels per channel
    job = client.post("/v1/jobs", json={"task": "slow-steps", "params": {"steps": 6, "delay": 0.03}}).json()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        events = [line for line in stream.iter_lines() if line.startswith(("event:", "data:"))]
    kinds = [e.split(": ", 1)[1] for e in events if e.startswith("event:")]
    steps = [json.loads(e[6:])["step"] for e in events if e.startswith("data:")]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and set(kinds[:-1]) <= {"progress"}
    assert 0 < len(kinds) and steps == sorted(steps) and steps[-1] == 6 and len(set(steps)) > 2


def test_a_failing_job_fails_alone(client: Any) -> None:
    bad = client.post("/v1/jobs", json={"task": "slow-steps", "params": {"steps": 2, "fail": True}}).json()
    good = client.post("/v1/jobs", json={"task": "slow-steps", "params": {"steps": 2}, "seed": 7}).json()
    failed, done = wait_for(client, bad["id"]), wait_for(client, good["id"])
    assert failed["state"] == "failed" and "RuntimeError: boom" in failed["error"]
    assert "Traceback" not in failed["error"] and failed["error_type"] == "PluginError"
    assert done["state"] == "done"
    response = client.get(f"/v1/jobs/{bad['id']}/result")
    assert response.status_code == 409 and "boom" in response.json()["error"]


def test_cancel_stops_within_one_step_and_queued_jobs_never_start(client: Any) -> None:
    running = client.post("/v1/jobs", json={"task": "slow-steps", "params": {"steps": 10_000, "delay": 0.01}}).json()
    queued = client.post("/v1/jobs", json={"task": "slow-steps", "params": {"steps": 1}}).json()
    deadline = time.monotonic() + 30
    while client.get(f"/v1/jobs/{running['id']}").json()["step"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    dropped = client.delete(f"/v1/jobs/{queued['id']}").json()
    assert dropped["state"] == "cancelled" and dropped["started"] is None
    at_cancel = client.delete(f"/v1/jobs/{running['id']}").json()["step"]
    final = wait_for(client, running["id"])
    assert final["state"] == "cancelled" and final["step"] <= at_cancel + 1 < 10_000
    assert client.get(f"/v1/jobs/{queued['id']}").json()["started"] is None
    after = client.post("/v1/jobs", json={"task": "slow-steps", "params": {"steps": 1}}).json()
    assert wait_for(client, after["id"])["state"] == "done"  # the worker goes on


def test_a_full_queue_answers_429_with_retry_after(make_client: Any) -> None:
    client = make_client(start_workers=False, queue_size=2)
    body = {"task": "posterize", "inputs": {"image": b64(png_bytes())}}
    assert [client.post("/v1/jobs", json=body).status_code for _ in range(2)] == [202, 202]
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert "queue is full" in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"task": "nope"}, 422, "unknown task 'nope'"),
        ({"task": "posterize", "inputs": [b64(png_bytes())], "params": {"levels": 1}}, 422, "out of range"),
        ({"task": "posterize", "inputs": [b64(png_bytes())], "params": {"colour": 1}}, 422, "no parameter 'colour'"),
        ({"task": "posterize", "inputs": ["bm90IGFuIGltYWdl"]}, 422, "is not an image"),
        ({"task": "posterize", "inputs": []}, 422, "takes 1 input"),
        ({"task": "posterize", "inputs": [b64(png_bytes())], "count": 99}, 422, "count"),
        ({"task": "posterize", "inputs": [b64(png_bytes())], "model": "x"}, 422, "not one of this server's models"),
        ({"task": "slow-steps", "backend": "onnx"}, 422, "uses no model, so it takes no backend"),
        ({"task": "superres", "inputs": [b64(png_bytes())], "backend": "warp"}, 422, "unknown backend 'warp'"),
    ],
)
def test_errors_are_one_line_json(client: Any, body: dict, status: int, message: str) -> None:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == status and message in response.json()["error"], response.text
    assert list(response.json()) == ["error"] and "\n" not in response.json()["error"]


def test_unknown_routes_and_jobs_are_json_404(client: Any) -> None:
    for path in ("/v1/jobs/missing", "/v1/jobs/missing/result", "/nowhere"):
        response = client.get(path)
        assert response.status_code == 404 and set(response.json()) == {"error"}
    response = client.post("/v1/jobs", content=b"{oops", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "not valid JSON" in response.json()["error"]


def test_import_difftool_and_help_stay_light() -> None:
    code = (
        "import sys, difftool, difftool.cli; from click.testing import CliRunner;"
        "r = CliRunner().invoke(difftool.cli.cli, ['serve', '--help']); assert r.exit_code == 0, r.output;"
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_previews_stream_as_events(client: Any, model_root: Any) -> None:
    body = {"task": "generate", "model": "tiny-sd", "seed": 4, "preview_every": 1,
            "params": {"prompt": "x", "steps": 3, "width": 24, "height": 16}}  # fmt: skip
    job = client.post("/v1/jobs", json=body).json()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        lines = list(stream.iter_lines())
    previews = [json.loads(lines[i + 1][6:]) for i, line in enumerate(lines) if line == "event: preview"]
    assert previews and all(1 <= p["step"] <= 3 for p in previews)
    assert Image.open(io.BytesIO(base64.b64decode(previews[-1]["image"]))).size == (24, 16)
    assert lines[-2] == "event: done" or "event: done" in lines


def test_a_worker_device_that_cannot_run_is_refused_at_start(serve_registry: Registry) -> None:
    from difftool.core.errors import ParameterError
    from difftool.serve.app import create_app
    from difftool.serve.settings import ServeSettings

    with pytest.raises(ParameterError, match="--device cuda:7"):
        create_app(ServeSettings(devices=("cpu", "cuda:7")), serve_registry)


def test_an_unexpected_error_is_json_without_a_traceback(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list:
        raise RuntimeError("secret detail\nTraceback (most recent call last)")

    monkeypatch.setattr(client.app.state.server.registry, "find_models", broken)
    response = client.get("/v1/models")
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (RuntimeError); the server log has the details"}


def test_without_the_serve_extra_the_command_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
        "from difftool.cli import main\n"
        "main(['serve', '--port', '1'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert 'pip install "difftool[serve]"' in out.stderr and "Traceback" not in out.stderr


def test_a_job_that_ignores_cancel_is_abandoned_and_the_queue_goes_on(client: Any) -> None:
    stuck = client.post("/v1/jobs", json={"task": "stuck", "params": {"seconds": 2.5}}).json()
    deadline = time.monotonic() + 30
    while client.get(f"/v1/jobs/{stuck['id']}").json()["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cancelled_at = time.monotonic()
    client.delete(f"/v1/jobs/{stuck['id']}")
    status = wait_for(client, stuck["id"], timeout=10)
    assert status["state"] == "cancelled" and "abandoned" in status["error"]
    after = client.post("/v1/jobs", json={"task": "slow-steps", "params": {"steps": 1}}).json()
    assert wait_for(client, after["id"])["state"] == "done"
    assert time.monotonic() - cancelled_at < 2  # served by a fresh worker, not after the stuck task returned
