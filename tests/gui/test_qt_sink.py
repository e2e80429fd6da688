"""The GUI's sink: a job run through ``api.execute`` reports steps as Qt signals and ends with what
``difftool.run`` makes, or with the one-line error."""

import os
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6", reason="the test extra installs PySide6")

from difftool.app import api  # noqa: E402
from difftool.gui.job_queue import Job, JobQueue  # noqa: E402


def _finish(qapp, queue: JobQueue, job: Job) -> None:
    queue.submit(job)
    deadline = time.monotonic() + 60
    while job.state in ("queued", "running") and time.monotonic() < deadline:
        qapp.processEvents()
        time.sleep(0.01)
    assert queue.wait(10_000)
    qapp.processEvents()


def test_the_qt_sink_signals_each_step_and_keeps_what_run_makes(qapp, registry, superres_model: Path, photo: Path):
    queue = JobQueue(preview_every=1)
    steps: list[tuple[int, int, int, bool]] = []
    queue.signals.progress.connect(lambda job_id, step, total, preview: steps.append((job_id, step, total, preview)))
    options = {"model": str(superres_model), "dtype": "fp32", "seed": 9, "registry": registry}
    job = Job("superres", [str(photo)], {"scale": "2", "steps": 2}, options)
    _finish(qapp, queue, job)
    assert job.state == "done", job.error
    assert [(s[1], s[2]) for s in steps] == [(1, 2), (2, 2)] and all(s[3] is not None for s in steps)
    made = api.run("superres", photo, model=str(superres_model), dtype="fp32", scale="2", steps=2, seed=9,
                   registry=registry)  # fmt: skip
    assert np.array_equal(np.asarray(job.result.image), np.asarray(made.image))
    assert job.result.record["seed"] == 9


def test_the_qt_sink_puts_a_bad_request_on_the_job_as_one_line(qapp, registry, superres_model: Path, photo: Path):
    queue = JobQueue()
    job = Job("superres", [str(photo)], {"scale": "5"}, {"model": str(superres_model), "registry": registry})
    _finish(qapp, queue, job)
    assert job.state == "failed" and "scale" in job.error and "\n" not in job.error
    assert "ParameterError" in job.details  # the traceback, for the details box
