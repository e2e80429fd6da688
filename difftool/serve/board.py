"""Jobs shared by the replicas of ``difftool serve --ray``: one board, many queues.

Under Ray Serve a job's requests may land on any replica: ``POST /v1/jobs`` on one, ``GET /v1/jobs/{id}``,
``/events``, ``/result`` and ``DELETE`` on others. The :class:`JobBoard` (one named Ray actor) is the only
place a job's state is read from; the replica that runs the job (its :class:`SharedJobQueue`) publishes
each change there: synchronously when the job is queued and when it ends (with its result PNGs), and its
progress and previews every :data:`SYNC_PERIOD` seconds, which also fetches the cancel flags the board
holds. A replica that stops publishing for ``stale_after`` seconds (killed, crashed) has its unfinished
jobs failed on the board with a clear error. Nothing here imports Ray: the actor is this plain class.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from difftool.core.atomic import atomic_write_bytes
from difftool.serve.job_queue import FINAL_STATES, Job, JobQueue

log = logging.getLogger("difftool.serve")

#: Seconds between a replica's progress publications (and its reads of the cancel flags).
SYNC_PERIOD = 0.1
#: Seconds without a publication after which a replica's unfinished jobs are declared lost.
STALE_AFTER = 10.0


class JobBoard:
    """Every job's latest status, result PNGs, latest preview and cancel flag (a Ray actor; one per app)."""

    def __init__(self, keep: int = 256, stale_after: float = STALE_AFTER) -> None:
        self.keep, self.stale_after = keep, stale_after
        self.jobs: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, float] = {}  # replica -> when it last published
        self.options: dict[str, Any] = {}

    def publish(self, replica: str, updates: list[dict[str, Any]]) -> list[str]:
        """Record ``updates`` from ``replica`` (older versions and changes to an ended job are ignored);
        return the ids of its jobs that were asked to stop."""
        self.seen[replica] = time.monotonic()
        for update in updates:
            entry = self.jobs.setdefault(
                update["id"], {"version": -1, "replica": replica, "cancel": False, "files": [], "preview": None}
            )
            ended = entry["version"] >= 0 and entry["status"]["state"] in FINAL_STATES
            if update["version"] <= entry["version"] or ended:
                continue
            entry.update(version=update["version"], status=update["status"], preview_step=update["preview_step"])
            if update.get("preview") is not None:
                entry["preview"] = update["preview"]
            if update.get("files") is not None:
                entry["files"] = update["files"]
        self._forget_old()
        # Ended ones included: a queued job cancelled here is dropped from its owner's queue when it hears this.
        return [job_id for job_id, e in self.jobs.items() if e["replica"] == replica and e["cancel"]]

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's ``status`` (as :meth:`Job.status`), ``version``, ``preview_step`` and ``cancel`` flag."""
        entry = self.jobs.get(job_id)
        if entry is None:
            return None
        self._check(entry)
        return {k: entry[k] for k in ("status", "version", "preview_step", "cancel")}

    def result(self, job_id: str) -> list[bytes]:
        entry = self.jobs.get(job_id)
        return list(entry["files"]) if entry else []

    def preview(self, job_id: str) -> bytes | None:
        entry = self.jobs.get(job_id)
        return entry["preview"] if entry else None

    def cancel(self, job_id: str) -> None:
        """A queued job ends here at once (its replica drops it on its next sync); a running one is flagged."""
        entry = self.jobs.get(job_id)
        if entry is None or entry["status"]["state"] in FINAL_STATES:
            return
        entry["cancel"] = True
        if entry["status"]["state"] == "queued":
            self._end(entry, "cancelled", "cancelled before it started", "Cancelled")

    def active(self) -> list[dict[str, Any]]:
        """Every queued or running job, oldest first (what A1111's ``/progress`` and ``/interrupt`` see)."""
        for entry in self.jobs.values():
            self._check(entry)
        return [self.get(i) for i, e in self.jobs.items() if e["status"]["state"] not in FINAL_STATES]  # type: ignore[misc]

    def get_options(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """The A1111 options; the first replica's ``defaults`` initialise them."""
        for name, value in defaults.items():
            self.options.setdefault(name, value)
        return dict(self.options)

    def set_option(self, name: str, value: Any) -> None:
        self.options[name] = value

    def _check(self, entry: dict[str, Any]) -> None:
        """Fail an unfinished job whose replica has gone silent."""
        silent = time.monotonic() - self.seen.get(entry["replica"], 0.0)
        if entry["status"]["state"] not in FINAL_STATES and silent > self.stale_after:
            message = (
                f"the replica running this job stopped answering ({silent:.0f} s; killed or crashed, Ray Serve "
                "replaces it); submit the job again"
            )
            self._end(entry, "failed", message, "ReplicaLost")

    def _end(self, entry: dict[str, Any], state: str, error: str, error_type: str) -> None:
        entry["status"] = {**entry["status"], "state": state, "error": error, "error_type": error_type,
                           "eta_seconds": None, "finished": time.time()}  # fmt: skip
        entry["version"] += 1

    def _forget_old(self) -> None:
        ended = sorted(
            (i for i, e in self.jobs.items() if e["status"]["state"] in FINAL_STATES),
            key=lambda i: self.jobs[i]["status"].get("finished") or 0.0,  # forget what ended first
        )
        for job_id in ended[: max(0, len(ended) - self.keep)]:
            del self.jobs[job_id]


class _Flag:
    def __init__(self, cancelled: bool) -> None:
        self.cancelled = cancelled


class BoardJob:
    """A job as the board sees it, with the attributes the routes read from a :class:`Job`; refreshed
    from the board at most every :data:`SYNC_PERIOD`/2 seconds (the events stream polls it)."""

    def __init__(self, queue: SharedJobQueue, job_id: str, entry: dict[str, Any]) -> None:
        self._queue, self.id, self._entry, self._at = queue, job_id, entry, time.monotonic()
        self._preview: bytes | None = None
        self._preview_step = 0
        self._files: list[Path] | None = None

    def _latest(self) -> dict[str, Any]:
        if time.monotonic() - self._at > SYNC_PERIOD / 2:
            self._entry = self._queue.call("get", self.id) or self._entry
            self._at = time.monotonic()
        return self._entry

    def status(self) -> dict[str, Any]:
        return dict(self._latest()["status"])

    def __getattr__(self, name: str) -> Any:  # state, step, total, index, created, seeds, error, error_type, task
        if name.startswith("_"):
            raise AttributeError(name)
        status = self._latest()["status"]
        if name in status:
            return status[name] if status[name] is not None or name not in ("error", "error_type") else ""
        raise AttributeError(name)

    @property
    def version(self) -> int:
        return self._latest()["version"]

    @property
    def token(self) -> _Flag:
        return _Flag(self._latest()["cancel"])

    @property
    def preview_step(self) -> int:
        return self._latest()["preview_step"]

    @property
    def preview(self) -> bytes | None:
        step = self.preview_step
        if step and step != self._preview_step:
            self._preview, self._preview_step = self._queue.call("preview", self.id), step
        return self._preview

    @property
    def files(self) -> list[Path]:
        """The result PNGs, copied from the board into this replica's output folder on first use."""
        if self._files is None:
            if self.state != "done":
                return []
            self._files = []
            for index, data in enumerate(self._queue.call("result", self.id)):
                path = self._queue.output_dir / f"board-{self.id}-{index}.png"
                if not path.exists():  # two requests may copy it at once: each temp file has its own name
                    atomic_write_bytes(path, data)
                    self._queue.cached(path)
                self._files.append(path)
        return self._files

    def progress(self) -> float:
        return self._latest()["status"]["progress"]

    def eta(self) -> float | None:
        return self._latest()["status"]["eta_seconds"]


class SharedJobQueue(JobQueue):
    """This replica's queue and workers, publishing to the :class:`JobBoard` and reading every job from it."""

    def __init__(self, board: Any, replica: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.board = board
        self.replica = replica or uuid.uuid4().hex
        self._stop_sync = threading.Event()
        self._published: dict[str, int] = {}  # job id -> preview step last sent
        self._copies: collections.deque[Path] = collections.deque()
        self._sync = threading.Thread(target=self._sync_loop, name="difftool-board-sync", daemon=True)

    def cached(self, path: Path) -> None:
        """Remember a result copied from the board; the oldest copies beyond ``keep`` are deleted."""
        if path in self._copies:  # copied twice at once: one entry
            return
        self._copies.append(path)
        while len(self._copies) > self.keep:
            self._copies.popleft().unlink(missing_ok=True)

    def call(self, method: str, *args: Any) -> Any:
        """``board.method(*args)``, waited for."""
        import ray

        return ray.get(getattr(self.board, method).remote(*args))

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        super().start()
        self._sync.start()

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        self._stop_sync.set()

    # --- requests -----------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        super().submit(job)
        self._publish([job])  # before the 202: any replica finds the job from now on
        return job

    def get(self, job_id: str) -> BoardJob | None:  # type: ignore[override]
        entry = self.call("get", job_id)
        return None if entry is None else BoardJob(self, job_id, entry)

    def cancel(self, job: Job | BoardJob) -> None:  # type: ignore[override]
        local = self.jobs.get(job.id)
        if local is not None and local.state not in FINAL_STATES:
            super().cancel(local)
        if isinstance(job, BoardJob):
            self.call("cancel", job.id)
            job._at = 0.0  # read the new state on the next look

    def running(self) -> list[BoardJob]:  # type: ignore[override]
        """Running jobs on every replica."""
        active = self.call("active")
        return [BoardJob(self, e["status"]["id"], e) for e in active if e["status"]["state"] == "running"]

    def waiting(self) -> int:
        return sum(e["status"]["state"] == "queued" for e in self.call("active"))

    # --- publishing ---------------------------------------------------------------------------------
    def extra_status(self, job: Job) -> dict[str, Any]:
        """Fields a subclass adds to the status it publishes."""
        return {}

    def _finish(self, job: Job, state: str, error: str = "", error_type: str = "") -> None:
        super()._finish(job, state, error, error_type)
        self._publish([job])

    def _publish(self, jobs: list[Job]) -> None:
        updates = []
        for job in jobs:
            status = {**job.status(), "replica": self.replica, **self.extra_status(job)}
            update: dict[str, Any] = {"id": job.id, "version": job.version, "status": status,
                                      "preview_step": job.preview_step}  # fmt: skip
            if job.preview is not None and self._published.get(job.id) != job.preview_step:
                update["preview"], self._published[job.id] = job.preview, job.preview_step
            if job.state == "done":
                update["files"] = [path.read_bytes() for path in job.files]
            if job.state in FINAL_STATES:
                self._published.pop(job.id, None)
            updates.append(update)
        try:
            stop = self.call("publish", self.replica, updates)
        except Exception as error:  # noqa: BLE001 - the board gone: jobs run on, their state is not shared
            log.warning("could not publish to the job board: %s", error)
            return
        for job_id in stop:
            local = self.jobs.get(job_id)
            if local is not None and local.state not in FINAL_STATES:
                JobQueue.cancel(self, local)

    def _sync_loop(self) -> None:
        sent: dict[str, int] = {}
        while not self._stop_sync.wait(SYNC_PERIOD):
            active = [job for job in list(self.jobs.values()) if job.state not in FINAL_STATES]
            if active:  # also the heartbeat that keeps this replica's jobs alive on the board
                self._publish([job for job in active if sent.get(job.id) != job.version] or active[:1])
                sent = {job.id: job.version for job in active}
