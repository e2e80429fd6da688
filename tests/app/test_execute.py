"""One execute loop, several sinks: files on disk and PNG bytes make what ``difftool.run`` makes; tasks
compose other tasks through the API (``context.run_task``), validated like a user's request."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from difftool.app import api
from difftool.app.plan import preflight
from difftool.core.errors import ParameterError
from difftool.core.images import read_metadata
from difftool.core.task import Param, Port, Task, TaskResult
from difftool.plugins import hookimpl
from difftool.plugins.registry import Registry, build_registry


def _plan(registry: Registry, superres_model: Path) -> Any:
    return preflight(
        "superres", model=str(superres_model), dtype="fp32", params={"scale": "2", "steps": 2}, registry=registry
    )


def _reference(registry: Registry, superres_model: Path, photo: Path, seed: int) -> np.ndarray:
    made = api.run("superres", photo, model=str(superres_model), dtype="fp32", scale="2", steps=2, seed=seed,
                   registry=registry)  # fmt: skip
    return np.asarray(made.image)


def test_the_file_sink_writes_what_run_makes_and_skips_it_when_up_to_date(
    registry: Registry, superres_model: Path, photo: Path, tmp_path: Path
) -> None:
    from difftool.app.folder_jobs import plan_job, process_item

    plan = _plan(registry, superres_model)
    job = plan_job(plan, specs=[str(photo)], output=str(tmp_path / "out"), base_seed=7, seed_given=True)
    steps: list[tuple[int, int]] = []
    record = process_item(job, job.items[0], plan, lambda step, total, preview: steps.append((step, total)))
    assert record["status"] == "ok" and steps[-1] == (2, 2)
    written = Path(job.items[0].outputs[0])
    assert np.array_equal(np.asarray(Image.open(written)), _reference(registry, superres_model, photo, 7))
    meta = read_metadata(written)["difftool"]
    assert meta["seed"] == 7 and meta["job"] == job.fingerprint and meta["input_sha256"]
    again = process_item(job, job.items[0], plan)
    assert again["status"] == "skipped" and again["seed"] == 7  # resumable: the output is up to date


def test_the_png_sink_sends_steps_and_the_cli_png_for_each_seed(
    registry: Registry, superres_model: Path, photo: Path, tmp_path: Path
) -> None:
    from difftool.serve.sink import PngSink

    events: list[tuple[Any, ...]] = []
    plan = _plan(registry, superres_model)
    assert api.execute(plan, [photo], [3, 4], PngSink(events.append), preview_every=1)
    done = [e for e in events if e[0] == "done"]
    assert [e[0] for e in events].count("step") == 4 and len(done) == 2
    assert all(e[3] is not None for e in events if e[0] == "step")  # previews as PNG bytes
    for seed, (_, pngs, record) in zip((3, 4), done, strict=True):
        image = Image.open(io.BytesIO(pngs[0]))
        assert np.array_equal(np.asarray(image), _reference(registry, superres_model, photo, seed))
        (tmp_path / "made.png").write_bytes(pngs[0])
        assert record["seed"] == seed and read_metadata(tmp_path / "made.png")["difftool"]["seed"] == seed
        assert str(superres_model.parent) not in str(record)  # no server paths


def test_the_png_sink_ends_a_cancelled_run_and_a_bad_input_with_one_event(
    registry: Registry, superres_model: Path
) -> None:
    from difftool.core.task import CancelToken
    from difftool.serve.sink import PngSink

    token = CancelToken()
    token.cancel()
    events: list[tuple[Any, ...]] = []
    assert not api.execute(_plan(registry, superres_model), [b"not an image"], [1, 2], PngSink(events.append))
    assert len(events) == 1 and events[0][0] == "error" and events[0][2] == "ImageError"
    events.clear()
    tiny = Image.new("RGB", (8, 8))
    assert not api.execute(_plan(registry, superres_model), [tiny], [1, 2], PngSink(events.append), cancel=token)
    assert events == [("cancelled",)]


class Compose(Task):
    """Upscales through the superres task with ``context.run_task``."""

    name = "compose"
    summary = "superres through run_task"
    uses_model = True
    params = (Param("factor", "string", default="2"),)
    inputs = (Port("image", "image"),)

    def run(self, request: Any, context: Any) -> TaskResult:
        factor = request.params["factor"]
        made = context.run_task("superres", [request.inputs["image"]], model=context.model, scale=factor, steps=2)
        return TaskResult(made.images, {"inner_seed": made.record["seed"]})


class ComposePlugin:
    @hookimpl
    def register_tasks(self, register: Any) -> None:
        register(Compose)


def test_run_task_runs_a_task_through_preflight_and_execute(superres_model: Path, photo: Path) -> None:
    registry = build_registry([ComposePlugin()], entry_points=False)
    made = api.run("compose", photo, model=str(superres_model), dtype="fp32", seed=5, registry=registry)
    assert made.record["inner_seed"] == 5  # the running context's seed
    assert np.array_equal(np.asarray(made.image), _reference(registry, superres_model, photo, 5))


def test_run_task_validates_the_parameters_it_passes(superres_model: Path, photo: Path) -> None:
    registry = build_registry([ComposePlugin()], entry_points=False)
    with pytest.raises(ParameterError) as caught:
        api.run("compose", photo, model=str(superres_model), factor="5", seed=1, registry=registry)
    assert "scale" in str(caught.value) and "\n" not in str(caught.value)
