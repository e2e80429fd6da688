"""The compute side of ``difftool serve --ray``: model replicas that run one seed of a job each call.

The HTTP replicas (the FastAPI application, light) queue jobs as the single-process server does; their
worker threads hand each run to the ``DifftoolWorker`` deployment through a Ray Serve handle, which picks
a model replica (one per GPU, or per ``--cpus-per-replica`` CPUs) and streams back progress, previews and
the result PNGs. When a model replica dies in the middle of a run (killed, out of memory, its node lost),
the handle raises and the run is sent again, to a live replica, at most :data:`WORKER_RETRIES` times: the
request that was waiting for it is answered as if nothing happened (same seed, same pixels).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from difftool.core.atomic import atomic_write_bytes
from difftool.core.errors import Cancelled, DifftoolError
from difftool.core.task import CancelToken
from difftool.serve.board import SharedJobQueue
from difftool.serve.job_queue import FINAL_STATES, Job
from difftool.serve.sink import PngSink

log = logging.getLogger("difftool.serve")

#: How often a run is sent again after the model replica running it died.
WORKER_RETRIES = 2
#: Seconds between a model replica's looks at the job's cancel flag on the board.
CANCEL_POLL = 0.1
#: How long a model replica waits for a stopped run's thread before taking the next request.
RUN_JOIN_SECONDS = 30.0


class RunFailed(DifftoolError):
    """A run failed on a model replica; ``kind`` is the error's type there."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class DifftoolWorker:
    """One model replica (a Ray Serve deployment): the registry, and the models its runs load, kept."""

    def __init__(self, plugins: tuple[str, ...] | None, device: str, threads: int, board: str, namespace: str) -> None:
        import ray

        from difftool.plugins.registry import build_registry, get_registry

        self.registry = get_registry() if plugins is None else build_registry(list(plugins), entry_points=False)
        self.device = device
        self.board = ray.get_actor(board, namespace=namespace)
        if threads:
            import torch

            torch.set_num_threads(threads)

    def run(self, spec: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
        """Run ``spec`` (task, fields, params, inputs, seed, preview_every, job); yield ``("step", step, total,
        preview PNG or None)`` events, then one ``("done", [PNG bytes], record)``, ``("cancelled",)`` or
        ``("error", message, type)``. The run stops within a step once the job's cancel flag is set."""
        import ray

        from difftool.app.api import execute
        from difftool.app.plan import preflight

        events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        token = CancelToken()
        checked = [0.0]

        def cancelled() -> bool:
            entry = ray.get(self.board.get.remote(spec["job"]))
            # Cancelled, or failed on the board because the HTTP replica waiting for it died: stop.
            return entry is None or entry["cancel"] or entry["status"]["state"] in FINAL_STATES

        class ReplicaSink(PngSink):
            def progress(self, step: int, total: int, preview: Any) -> None:
                now = time.monotonic()
                if now - checked[0] > CANCEL_POLL:
                    checked[0] = now
                    if cancelled():
                        token.cancel()
                super().progress(step, total, preview)

        def target() -> None:
            sink = ReplicaSink(events.put, f"job {spec['job']}")
            try:
                if cancelled():
                    raise Cancelled()  # cancelled while it waited for this replica: load nothing
                fields = {**spec["fields"], "device": self.device}
                plan = preflight(spec["task"], params=spec["params"], registry=self.registry, **fields)
            except Exception as error:  # noqa: BLE001 - the sink sends it as the run's end
                sink.failed(None, error)
                return
            execute(plan, spec["inputs"], [spec["seed"]], sink, preview_every=spec["preview_every"], cancel=token)

        thread = threading.Thread(target=target, name="difftool-run", daemon=True)
        thread.start()
        yield ("started", ray.get_runtime_context().get_actor_name())
        try:
            while True:
                event = events.get()
                yield event
                if event[0] != "step":
                    return
        finally:
            token.cancel()  # the caller stopped listening: stop within a step
            thread.join(RUN_JOIN_SECONDS)  # one run at a time on this device, as max_ongoing_requests says


class RemoteJobQueue(SharedJobQueue):
    """An HTTP replica's queue whose worker threads run each job on the model replicas (``worker``: the
    ``DifftoolWorker`` deployment's handle)."""

    def __init__(self, board: Any, replica: str, worker: Any, worker_device: str, **kwargs: Any) -> None:
        super().__init__(board, replica, **kwargs)
        self.worker, self.worker_device = worker, worker_device
        self.model_replicas: dict[str, str] = {}  # job id -> the model replica running it
        #: job id -> the dtype the request asked for: this replica resolved ``auto`` for its CPU, not the model
        #: replica's device (see :meth:`spec`).
        self.dtypes: dict[str, str] = {}

    def submit(self, job: Job) -> Job:
        try:
            return super().submit(job)
        except DifftoolError:
            self.dtypes.pop(job.id, None)
            raise

    def spec(self, job: Job, seed: int) -> dict[str, Any]:
        """What a model replica needs for one run of ``job``: the request, preflighted again there for its device."""
        plan = job.plan
        fields = {**plan.request_fields(), "dtype": self.dtypes.get(job.id, "auto")}
        return {"task": plan.task_name, "fields": fields, "params": plan.params, "inputs": job.inputs,
                "seed": seed, "preview_every": job.preview_every, "job": job.id}  # fmt: skip

    def extra_status(self, job: Job) -> dict[str, Any]:
        return {"model_replica": self.model_replicas.get(job.id)}

    def cancel(self, job: Any) -> None:
        super().cancel(job)
        if isinstance(job, Job):  # the model replica running it reads the flag from the board
            self.call("cancel", job.id)

    def _finish(self, job: Job, state: str, error: str = "", error_type: str = "") -> None:
        super()._finish(job, state, error, error_type)  # published with its model replica, then forgotten here
        self.model_replicas.pop(job.id, None)
        self.dtypes.pop(job.id, None)

    def _run(self, job: Job, device: str) -> None:
        try:
            job.device = self.worker_device
            for index, seed in enumerate(job.seeds):
                job.index, job.step = index, 0
                pngs, record = self._run_once(job, seed)
                for number, data in enumerate(pngs):
                    path = self.output_dir / f"{job.id}-{index}-{number}.png"
                    atomic_write_bytes(path, data)
                    job.files.append(path)
                job.records.append(record)
                job._changed()
            self._finish(job, "done")
        except Cancelled:
            self._finish(job, "cancelled", "cancelled")
        except RunFailed as error:
            self._finish(job, "failed", str(error), error.kind)
        except Exception as error:  # noqa: BLE001 - fails its job, not the server
            log.exception("job %s (%s) failed", job.id, job.task)
            self._finish(job, "failed", f"unexpected error: {type(error).__name__}: {error}", type(error).__name__)

    def _run_once(self, job: Job, seed: int) -> tuple[list[bytes], dict[str, Any]]:
        from ray.exceptions import RayActorError

        spec = self.spec(job, seed)
        flagged = False
        for attempt in range(WORKER_RETRIES + 1):
            try:
                for event in self.worker.options(stream=True).run.remote(spec):
                    if event[0] == "started":
                        self.model_replicas[job.id] = event[1]
                    elif event[0] == "step":
                        if job.token.cancelled and not flagged:  # cancelled here only (shutdown): tell the run
                            self.call("cancel", job.id)
                            flagged = True
                        job.step, job.total = event[1], event[2]
                        if event[3] is not None:
                            job.preview, job.preview_step = event[3], event[1]
                        job._changed()
                    elif event[0] == "done":
                        return event[1], event[2]
                    elif event[0] == "cancelled":
                        raise Cancelled()
                    else:
                        raise RunFailed(event[1], event[2])
            except RayActorError as error:
                log.warning("job %s: its model replica died (attempt %d): %s", job.id, attempt + 1, error)
                if job.token.cancelled:
                    raise Cancelled() from None  # nobody wants it any more: do not send it again
                job.step = 0
                job._changed()
                time.sleep(1.0 + attempt)  # let Ray Serve notice the dead replica before routing again
        raise RunFailed(
            f"the model replicas running this job died {WORKER_RETRIES + 1} times; submit it again", "ReplicaLost"
        )
