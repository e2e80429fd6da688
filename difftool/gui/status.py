"""The status bar: what is on screen, and what the job it names is doing (each phase, not just steps)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from PySide6.QtWidgets import QLabel, QProgressBar, QPushButton, QStatusBar, QWidget


class RunStatus:
    """Two lines of truth in the status bar: the image on screen, and the job (loading, exporting, running)."""

    def __init__(self, bar: QStatusBar, on_cancel: Callable[[], None], first: QWidget | None = None) -> None:
        self.bar = bar
        self.image = QLabel("no image")
        self.job = QLabel()
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(240)
        self.progress.setFormat("%v / %m")
        self.progress.setValue(0)
        self.eta = QLabel()
        self.batch = QLabel()  # a dropped batch's overall count: "batch: 3 / 12 done"
        self.pointer = QLabel()  # the pixel under the pointer (never hides the image line)
        self.zoom = QLabel()  # the canvas's zoom, updated by every zoom, fit and resize
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(on_cancel)
        bar.addWidget(self.image, 1)
        bar.addPermanentWidget(self.pointer)
        bar.addPermanentWidget(self.zoom)
        if first is not None:
            bar.addPermanentWidget(first)
        bar.addPermanentWidget(self.batch)
        bar.addPermanentWidget(self.job)
        bar.addPermanentWidget(self.progress)
        bar.addPermanentWidget(self.eta)
        bar.addPermanentWidget(self.cancel_button)
        self._started: dict[int, float] = {}

    def showing(self, text: str) -> None:
        """Describe the image on screen (``photo.png — 160×120 RGB``, ``result of #3 superres ...``)."""
        self.image.setText(text)

    def started(self, job: Any) -> None:
        self._started[job.id] = time.perf_counter()
        self.phase(job, "starting", None, None)

    def phase(self, job: Any, what: str, done: int | None, total: int | None) -> None:
        """A phase with no step count shows a busy bar: the app is working, not stuck at 0."""
        job.phase = what
        if job.token.cancelled:
            return
        self.job.setText(f"#{job.id} {job.task}: {what}…")
        self.eta.clear()
        if done is None or not total:
            self.progress.setRange(0, 0)
        else:
            self.progress.setRange(0, total)
            self.progress.setValue(done)

    def cancelling(self, job: Any) -> None:
        """Cancel was asked: said at once (the job stops at its next step, which may take a while)."""
        self.job.setText(f"#{job.id} {job.task}: cancelling…")
        self.eta.clear()
        self.progress.setRange(0, 0)  # busy until it stops
        self.cancel_button.setEnabled(False)

    def step(self, job: Any, step: int, total: int) -> None:
        if job.token.cancelled:  # a step that finished after Cancel: still cancelling
            return
        job.phase = f"running, step {step} / {total}"
        self.job.setText(f"#{job.id} {job.task}: {job.phase}")
        self.progress.setRange(0, total)
        self.progress.setValue(step)
        started = self._started.get(job.id)
        if step and started is not None:
            remaining = (time.perf_counter() - started) / step * (total - step)
            self.eta.setText(f"ETA {remaining:.0f} s")

    def finished(self, job: Any, message: str = "") -> None:
        """The job's end; ``message``: its error as the window words it (default: the raw error)."""
        seconds = time.perf_counter() - self._started.pop(job.id, time.perf_counter())
        self.eta.clear()
        if self.progress.maximum() == 0:  # never stepped: no busy bar left spinning
            self.progress.setRange(0, 1)
        if job.state == "done":
            self.progress.setValue(self.progress.maximum())
            self.job.setText(f"#{job.id} {job.task}: done in {seconds:.1f} s")
        else:
            self.progress.setValue(0)
            why = f": {message or job.error}" if job.state == "failed" and job.error else ""
            self.job.setText(f"#{job.id} {job.task}: {job.state}{why}"[:160])

    def batch_progress(self, jobs: list[Any]) -> None:
        """How far a dropped batch is: its jobs that ended, of all of them (failed and cancelled named)."""
        if not jobs:
            self.batch.clear()
            return
        ended = [job for job in jobs if job.state in ("done", "failed", "cancelled")]
        others = [f"{n} {state}" for state in ("failed", "cancelled") if (n := sum(j.state == state for j in jobs))]
        self.batch.setText(f"batch: {len(ended)} / {len(jobs)} done" + (f" ({', '.join(others)})" if others else ""))

    def running(self, running: bool, cancelling: bool = False) -> None:
        self.cancel_button.setEnabled(running and not cancelling)
