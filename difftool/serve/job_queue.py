"""The job queue: bounded, one worker thread per device, progress and cancel through the GUI's hooks.

A job is a preflighted :class:`~difftool.app.plan.Plan` plus its loaded inputs and seeds. Workers run it
with :func:`difftool.app.api.execute` (models stay loaded in the process's runtime between jobs) into a
:class:`~difftool.serve.sink.PngSink`, and write each output's PNG (the CLI's, with its metadata) atomically.
A job that raises fails alone; the worker goes on with the next one.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftool.app.plan import Plan
from difftool.core.atomic import atomic_write_bytes
from difftool.core.errors import DifftoolError
from difftool.core.task import CancelToken
from difftool.serve.errors import without_paths
from difftool.serve.results import make_results_dir, remove_orphaned_results
from difftool.serve.sink import Event, PngSink

if TYPE_CHECKING:
    from difftool.app.api import Item

log = logging.getLogger("difftool.serve")

#: States a job ends in.
FINAL_STATES = frozenset({"done", "failed", "cancelled"})


class QueueFull(DifftoolError):
    """The queue holds ``--queue-size`` waiting jobs (HTTP 429 with ``Retry-After``)."""

    def __init__(self, problem: str, fix: str, retry_after: int) -> None:
        super().__init__(problem, fix)
        self.retry_after = retry_after


class ShuttingDown(QueueFull):
    """The server is draining after SIGTERM: it takes no more jobs (HTTP 503 with ``Retry-After``)."""

    status = 503


#: The ``error_type`` of a job the shutdown failed or cancelled (answered 503, not the job's own failure).
SHUTDOWN = "ShuttingDown"
#: Seconds after the drain's deadline that a cancelled job has to reach its next step.
CANCEL_GRACE = 2.0


@dataclass
class Job:
    """One request: ``len(seeds)`` runs of ``plan`` on ``inputs`` (seeds SEED, SEED+1, ... for batches)."""

    plan: Plan
    inputs: list[Any]
    seeds: list[int]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = "queued"  # queued, running, done, failed, cancelled
    step: int = 0
    total: int = 0
    index: int = 0  # which of the seeds is running
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str = ""
    error_type: str = ""
    device: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    #: The seed each of :attr:`files` was made with.
    file_seeds: list[int] = field(default_factory=list)
    #: Decode a preview every this many steps (0: never); the latest is kept as PNG bytes.
    preview_every: int = 0
    preview: bytes | None = None
    preview_step: int = 0
    token: CancelToken = field(default_factory=CancelToken)
    done: threading.Event = field(default_factory=threading.Event)
    worker: threading.Thread | None = field(default=None, repr=False)
    #: Bumped on every change, so an events stream sends only what changed.
    version: int = 0

    @property
    def task(self) -> str:
        return self.plan.task_name

    def progress(self) -> float:
        """Fraction done in [0, 1], over all seeds."""
        if self.state == "done":
            return 1.0
        per_run = self.step / self.total if self.total else 0.0
        return min(1.0, (self.index + per_run) / max(1, len(self.seeds)))

    def eta(self) -> float | None:
        """Seconds left, from the time the steps so far took (``None`` before the first step)."""
        fraction = self.progress()
        if self.state != "running" or self.started is None or fraction <= 0:
            return None
        elapsed = time.time() - self.started
        return max(0.0, elapsed / fraction - elapsed)

    def status(self) -> dict[str, Any]:
        """The job as JSON: state, progress, ETA, error, and the record of each finished output."""
        eta = self.eta()
        return {
            "id": self.id,
            "task": self.task,
            "state": self.state,
            "step": self.step,
            "total": self.total,
            "index": self.index,
            "count": len(self.seeds),
            "progress": round(self.progress(), 4),
            "eta_seconds": None if eta is None else round(eta, 2),
            "device": self.device or None,
            "seeds": self.seeds,
            "error": self.error or None,
            "error_type": self.error_type or None,
            "outputs": len(self.files),
            "records": self.records,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
        }

    def _changed(self) -> None:
        self.version += 1


class JobQueue:
    """Bounded FIFO of jobs; one worker thread per device takes the oldest waiting job."""

    def __init__(
        self, devices: tuple[str, ...] = ("cpu",), queue_size: int = 16, keep: int = 256, abandon_after: float = 10.0
    ) -> None:
        self.devices = devices
        self.queue_size = queue_size
        self.keep = keep
        #: Seconds a cancelled job may take to reach a step boundary before it is abandoned (see :meth:`cancel`).
        self.abandon_after = abandon_after
        self._retired: set[threading.Thread] = set()
        self.jobs: dict[str, Job] = {}
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._mean_seconds = 5.0  # a moving average of job durations, for Retry-After
        #: When draining ends (monotonic seconds): running jobs are cancelled then; ``None`` until SIGTERM.
        self._deadline: float | None = None
        self._overdue = float("inf")
        remove_orphaned_results()
        self.output_dir, self._marker = make_results_dir()

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        for device in self.devices:
            self._start_worker(device)

    def _start_worker(self, device: str) -> None:
        thread = threading.Thread(target=self._work, args=(device,), name=f"difftool-worker-{device}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def drain(self, timeout: float) -> None:
        """Begin shutting down, without waiting: new jobs are refused (503), waiting ones fail (503 to their
        A1111 callers), running ones may finish for ``timeout`` seconds and are then cancelled (they stop within
        one step). Finished results stay fetchable until :meth:`stop`. Called on SIGTERM, before the HTTP
        server waits for its open requests, so those are answered (in JSON) within the shutdown timeout."""
        with self._lock:
            if self._deadline is not None:
                return
            self._stopping, self._deadline = True, time.monotonic() + timeout
            # Past this, a request still waiting for its job is answered without it (see :meth:`overdue`).
            self._overdue = self._deadline + min(CANCEL_GRACE / 2, timeout / 3)
            while self._waiting:
                self._finish(self._waiting.popleft(), "failed", "the server shut down before the job started", SHUTDOWN)
            self._lock.notify_all()
        timer = threading.Timer(timeout, self._cancel_running)
        timer.daemon = True
        timer.start()

    def overdue(self) -> bool:
        """Whether the drain's deadline and a short grace have passed: a request still waiting for its job
        then answers 503 at once (the job was cancelled; it may take a step longer to stop), so the HTTP
        server, which stops waiting at ``--shutdown-timeout``, never has to cut it off with a plain-text 500."""
        return self._deadline is not None and time.monotonic() > self._overdue

    def _cancel_running(self) -> None:
        for job in JobQueue.running(self):  # this process's jobs (a subclass's running() may see more)
            job.error_type = SHUTDOWN
            job.token.cancel()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain (see :meth:`drain`; a drain already begun keeps its deadline), wait for the workers until the
        deadline and a short grace for cancelled jobs, then remove the result files. A task hung in its own code
        keeps its (daemon) thread: it is not waited for beyond that. Outputs are only ever written whole."""
        self.drain(timeout)
        assert self._deadline is not None
        for thread in self._threads:
            thread.join(max(0.0, self._deadline - time.monotonic()))
        self._cancel_running()
        grace = time.monotonic() + CANCEL_GRACE
        for thread in self._threads:
            thread.join(max(0.0, grace - time.monotonic()))
        self.remove_results()

    def remove_results(self) -> None:
        """Delete the result folder this queue made (and release its marker)."""
        shutil.rmtree(self.output_dir, ignore_errors=True)
        if self._marker >= 0:
            os.close(self._marker)
            self._marker = -1

    # --- requests -----------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue ``job``, or raise :class:`QueueFull` (HTTP 429) when ``queue_size`` jobs wait already."""
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down", "retry shortly or on another server", retry_after=30)
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(
                    f"the queue is full ({self.queue_size} jobs waiting)",
                    "retry after the Retry-After seconds",
                    retry_after=self.retry_after(),
                )
            self.jobs[job.id] = job
            self._waiting.append(job)
            self._forget_old()
            self._lock.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def cancel(self, job: Job) -> None:
        """Cancel ``job``: a waiting one never starts, a running one stops within one step.

        A task that never reaches a step boundary (hung in a plugin's code) cannot be stopped from another
        thread: after :attr:`abandon_after` seconds it is reported cancelled, its worker thread is retired
        (its eventual result discarded) and a fresh worker takes over the device's queue.
        """
        with self._lock:
            if job.state == "queued":
                self._waiting.remove(job)
                self._finish(job, "cancelled", "cancelled before it started")
                return
        if job.state == "running" and not job.token.cancelled:
            job.token.cancel()
            timer = threading.Timer(self.abandon_after, self._abandon, args=(job, job.worker))
            timer.daemon = True
            timer.start()

    def _abandon(self, job: Job, worker: threading.Thread | None) -> None:
        with self._lock:
            if job.state != "running" or worker is None or self._stopping:
                return
            self._retired.add(worker)
            self._finish(job, "cancelled", f"abandoned: the task did not stop within {self.abandon_after:g} s")
            log.warning("job %s (%s) did not stop after its cancel; its worker is replaced", job.id, job.task)
            self._start_worker(job.device)

    def running(self) -> list[Job]:
        return [job for job in list(self.jobs.values()) if job.state == "running"]

    def waiting(self) -> int:
        return len(self._waiting)

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free."""
        return max(1, math.ceil(self._mean_seconds / max(1, len(self.devices))))

    # --- workers ------------------------------------------------------------------------------------
    def _work(self, device: str) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self._waiting:
                    return
                job = self._waiting.popleft()
                job.state, job.started, job.device, job.worker = "running", time.time(), device, me
                job._changed()
            self._run(job, device)
            with self._lock:
                if me in self._retired:  # abandoned while its job hung: a fresh worker has taken over
                    self._retired.discard(me)
                    return

    def _run(self, job: Job, device: str) -> None:
        from difftool.app.api import execute

        sink = _QueueSink(self, job)
        try:
            plan = job.plan if job.plan.backend.device == device else _replan(job.plan, device)
        except Exception as error:  # noqa: BLE001 - the sink fails the job with it
            sink.failed(None, error)
            return
        if execute(plan, job.inputs, job.seeds, sink, preview_every=job.preview_every, cancel=job.token):
            self._finish(job, "done")

    def _finish(self, job: Job, state: str, error: str = "", error_type: str = "") -> None:
        with self._lock:  # the worker and the abandon timer may both get here
            if job.done.is_set():  # abandoned already: what its task did after that is discarded
                return
            job.state, job.error, job.finished = state, without_paths(error), time.time()
            if state == "cancelled" and error_type != SHUTDOWN:
                error_type = "Cancelled"
            job.error_type = error_type or job.error_type
            if job.started is not None and state == "done":
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (job.finished - job.started)
            # A kept job holds its status and result files, not its decoded inputs (megabytes each).
            job.inputs, job.preview = [], None
            plain = (str, int, float, bool)
            job.plan.params = job.plan.params.replace(
                **{k: None for k, v in job.plan.params.items() if v is not None and not isinstance(v, plain)}
            )
            job._changed()
            job.done.set()

    def _forget_old(self) -> None:
        """Drop the oldest finished jobs (and their files) beyond ``keep``; called under the lock."""
        finished = [job for job in self.jobs.values() if job.state in FINAL_STATES]
        for job in finished[: max(0, len(finished) - self.keep)]:
            del self.jobs[job.id]
            for path in job.files:
                path.unlink(missing_ok=True)


def _replan(plan: Plan, device: str) -> Plan:
    """The same request preflighted for this worker's device."""
    from difftool.app.plan import preflight

    fields = {**plan.request_fields(), "device": device}
    return preflight(plan.task_name, params=plan.params, registry=plan.registry, **fields)


class _QueueSink(PngSink):
    """A job of this process's queue: its progress, previews and result files, and its end state."""

    def __init__(self, queue: JobQueue, job: Job) -> None:
        super().__init__(self._event, f"job {job.id} ({job.task})")
        self.queue, self.job = queue, job

    def started(self, item: Item) -> bool:
        self.job.index, self.job.step = item.index, 0
        return super().started(item)

    def progress(self, step: int, total: int, preview: Any) -> None:
        if not self.job.done.is_set():  # abandoned: its state is final
            super().progress(step, total, preview)

    def _event(self, event: Event) -> None:
        job, queue = self.job, self.queue
        if event[0] == "step":
            if event[3] is not None:
                job.preview, job.preview_step = event[3], event[1]
            job.step, job.total = event[1], event[2]
            job._changed()
        elif event[0] == "done":
            index = self.item.index if self.item is not None else job.index
            for number, data in enumerate(event[1]):
                path = queue.output_dir / f"{job.id}-{index}-{number}.png"
                atomic_write_bytes(path, data)
                job.files.append(path)
                job.file_seeds.append(job.seeds[index])
            job.records.append(event[2])
            job._changed()
        elif event[0] == "cancelled":
            shutdown = job.error_type == SHUTDOWN
            queue._finish(job, "cancelled", "the server shut down" if shutdown else "cancelled", job.error_type)
        else:
            queue._finish(job, "failed", event[1], event[2])

    def failed(self, item: Item | None, error: BaseException) -> None:
        super().failed(item, error)
        if not isinstance(error, DifftoolError):  # a task's bug, or out of memory: free what it held
            _release_memory()


def _release_memory() -> None:
    try:
        from difftool.core.devices import release_memory

        release_memory()
    except Exception:  # noqa: BLE001 - best effort after a failure
        pass
