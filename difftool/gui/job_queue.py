"""A job queue that runs tasks one at a time on a worker thread and reports through Qt signals."""

from __future__ import annotations

import itertools
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QObject, QRunnable, QThreadPool, QTimer, Signal

from difftool.core.errors import Cancelled, DifftoolError
from difftool.core.task import CancelToken

if TYPE_CHECKING:
    from difftool.app.api import Item


@dataclass
class Job:
    task: str
    inputs: list[Any]
    params: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)  # model, backend, device, dtype, seed, registry
    id: int = 0
    state: str = "queued"  # queued, running, done, failed, cancelled
    token: CancelToken = field(default_factory=CancelToken)
    result: Any = None
    error: str = ""
    phase: str = ""  # what a running job is doing: "loading model x", "running, step 3 / 20"
    details: str = ""  # a failure's traceback
    #: Where the input came from, for the result's name, folder and status line (a chain: photo.superres).
    source_name: str = ""
    source_stem: str = "image"
    source_dir: str = ""
    #: The input as shown in the compare view (a QImage, made on first display).
    before: Any = None
    #: The dropped batch the job belongs to (0: none): saved together, counted together.
    batch: int = 0

    def label(self) -> str:
        if self.state == "running" and self.token.cancelled:  # a CPU step can take 15 s: say so at once
            return f"#{self.id} {self.task} — cancelling…"
        return f"#{self.id} {self.task} — {self.phase if self.state == 'running' and self.phase else self.state}"


class JobSignals(QObject):
    started = Signal(int)
    progress = Signal(int, int, int, object)  # job id, step, total, preview image or None
    phase = Signal(int, str, int, int)  # job id, what (loading a model, exporting), done, total (-1: unknown)
    abandoned = Signal(int)  # a cancelled job that never reached a step boundary was given up
    cancelling = Signal(int)  # a running job was asked to stop; it stops at its next step
    finished = Signal(int)  # job id; the job holds its result or error
    changed = Signal()  # the queue's contents or states changed


class QtSink:
    """A GUI job's run (:func:`difftool.app.api.execute`'s sink): steps and previews as :class:`JobSignals`, the
    result or the error (with its traceback) on the job."""

    def __init__(self, job: Job, signals: JobSignals) -> None:
        self.job, self.signals = job, signals

    def started(self, item: Item) -> bool:
        return True

    def progress(self, step: int, total: int, preview: Any) -> None:
        self.signals.progress.emit(self.job.id, step, total, preview)

    def phase(self, what: str, done: int | None, total: int | None) -> None:
        self.signals.phase.emit(self.job.id, what, -1 if done is None else done, -1 if total is None else total)

    def finished(self, item: Item | None, result: Any) -> None:
        self.job.result, self.job.state = result, "done"

    def failed(self, item: Item | None, error: BaseException) -> None:
        job = self.job
        if isinstance(error, Cancelled):
            job.state = "cancelled"
        elif isinstance(error, Exception):  # the app must survive any task's bug
            unexpected = not isinstance(error, DifftoolError)
            job.state = "failed"
            job.error = f"unexpected error: {type(error).__name__}: {error}" if unexpected else str(error)
            job.details = "".join(traceback.format_exception(error))


class _Runner(QRunnable):
    def __init__(self, job: Job, signals: JobSignals, preview_every: int) -> None:
        super().__init__()
        self.job, self.signals, self.preview_every = job, signals, preview_every

    def run(self) -> None:
        from difftool.app import api
        from difftool.app.plan import preflight
        from difftool.gui.remote import RemoteRegistry

        job, sink = self.job, QtSink(self.job, self.signals)
        try:
            options = dict(job.options)  # model, backend, device, dtype, seed, registry
            registry = options.pop("registry", None)
            if isinstance(registry, RemoteRegistry):  # connected to a server: the job runs there
                result = registry.run(
                    job.task, job.inputs, job.params, options, sink.progress, job.token, self.preview_every
                )
                sink.finished(None, result)
            else:
                seed = options.pop("seed", None)
                seed = api.new_seed() if seed is None else api.check_seed(seed)
                plan = preflight(job.task, registry=registry, params=job.params, **options)
                api.execute(
                    plan, job.inputs, [seed], sink, preview_every=self.preview_every, cancel=job.token, phase=sink.phase
                )
        except Exception as error:  # noqa: BLE001 - the sink puts it on the job
            sink.failed(None, error)
        self.signals.finished.emit(job.id)


class JobQueue(QObject):
    """Jobs run in submission order, one at a time; cancelling a queued job never touches the running one."""

    def __init__(self, preview_every: int = 0, pool: QThreadPool | None = None) -> None:
        super().__init__()
        self.signals = JobSignals()
        self.pool = pool or QThreadPool.globalInstance()
        self.preview_every = preview_every
        self.jobs: dict[int, Job] = {}
        self.pending: list[int] = []
        self.running: int | None = None
        self.abandoned: set[int] = set()
        #: How long a cancelled job may take to reach a step boundary before it is abandoned.
        self.abandon_after_ms = 3000
        self._ids = itertools.count(1)
        self.signals.finished.connect(self._on_finished)

    def submit(self, job: Job) -> int:
        job.id = next(self._ids)
        self.jobs[job.id] = job
        self.pending.append(job.id)
        self.signals.changed.emit()
        self._start_next()
        return job.id

    def cancel(self, job_id: int) -> None:
        job = self.jobs[job_id]
        if job.state == "queued":
            self.pending.remove(job_id)
            job.state = "cancelled"
            self.signals.changed.emit()
        elif job.state == "running":
            job.token.cancel()  # the sampler stops before its next step
            self.signals.cancelling.emit(job_id)
            # A task that never reaches a step boundary (hung in a plugin's code) cannot be stopped from
            # another thread; after the grace period it is abandoned: marked cancelled, its eventual
            # result discarded, and the queue moves on.
            QTimer.singleShot(self.abandon_after_ms, lambda: self._abandon(job_id))

    def _abandon(self, job_id: int) -> None:
        job = self.jobs[job_id]
        if self.running != job_id or job.state != "running":
            return
        job.state, job.error = "cancelled", "abandoned: the task did not stop within the grace period"
        self.abandoned.add(job_id)
        self.running = None
        self.signals.abandoned.emit(job_id)
        self.signals.changed.emit()
        self._start_next()

    def _start_next(self) -> None:
        if self.running is not None or not self.pending:
            return
        job = self.jobs[self.pending.pop(0)]
        job.state, self.running = "running", job.id
        self.signals.started.emit(job.id)
        self.signals.changed.emit()
        self.pool.start(_Runner(job, self.signals, self.preview_every))

    def _on_finished(self, job_id: int) -> None:
        if job_id in self.abandoned:  # it finished after all; it was already reported cancelled
            job = self.jobs[job_id]
            job.state, job.result = "cancelled", None
            return
        if self.running == job_id:
            self.running = None
        self.signals.changed.emit()
        self._start_next()

    def wait(self, timeout_ms: int = 60_000) -> bool:
        """Block until the pool is idle (tests and shutdown)."""
        return self.pool.waitForDone(timeout_ms)
