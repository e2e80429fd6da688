"""``--executor ray``: a folder job as a Ray Data pipeline over a pool of actors.

Each actor builds the plugin registry the driver used (built-ins, entry points and any plugin
modules passed by name) and keeps its task's model loaded between inputs; it reads each input's
bytes itself (local paths or any URI pyarrow reads), so decoding and validation are difftool's
own, and it writes each output atomically. Ray restarts a killed actor and retries its input
(bounded); since outputs are written with temp file + rename under deterministic names, a retry
never leaves a half-written or duplicated file. No scheduling logic of our own lives here.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from typing import Any

from difftool.app.folder_jobs import FolderJob, JobItem, process_item
from difftool.core.errors import BackendUnavailableError, ParameterError

#: Bounded fault tolerance: how often Ray restarts a dead actor and retries an input on it.
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3
#: Environment a local Ray's workers inherit (offline mode, difftool's settings, test hooks).
FORWARDED_ENV_PREFIXES = ("DIFFTOOL_", "HF_", "TORCH_")


class TaskActor:
    """One Ray actor: a registry, the job's plan (preflighted once, here), and whatever model the task loads."""

    def __init__(self, job: FolderJob) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from difftool.app.plan import preflight
        from difftool.plugins.registry import build_registry

        self.job = job
        self.registry = build_registry(list(job.plugin_modules), entry_points=job.entry_points)
        request = dict(job.common)
        if str(request.get("device", "")).startswith("cuda"):
            # Ray gives each actor its own GPU(s) and makes them the only visible ones: the driver's cuda:N
            # is this actor's cuda:0.
            request["device"] = "cuda"
        self.plan = preflight(job.task, registry=self.registry, params=job.params, **request)
        if job.torch_threads:
            import torch

            torch.set_num_threads(job.torch_threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        records = []
        for raw in batch["item"]:
            fields = json.loads(raw)
            item = JobItem(fields["source"], fields["key"], tuple(fields["outputs"]), fields["seed"])
            records.append(json.dumps(process_item(self.job, item, self.plan)))
        return {"record": np.array(records, dtype=object)}


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailableError(
            "--executor ray needs Ray, which is not installed", "pip install 'difftool[ray]'"
        ) from exc
    return ray


def start_ray(address: str | None = None) -> Any:
    """Connect to ``address`` (``auto``, ``ray://HOST:PORT``) or start a local Ray with this machine's CPUs."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        # Local workers import what the driver imports: same interpreter, same path (plugins by module name).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        from difftool.core.cuda import runtime

        ray.init(
            num_cpus=os.cpu_count(),
            num_gpus=runtime().device_count(),  # what this process sees through the CUDA runtime
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env},
            object_store_memory=256 * 2**20,  # inputs/outputs are files; the store only carries records
        )
    return ray


def run_on_ray(
    job: FolderJob,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Process every item of ``job`` on Ray Data; one record per input, in completion order."""
    import dataclasses

    import torch
    from tqdm import tqdm

    from difftool.plugins.registry import build_registry

    job = dataclasses.replace(job, torch_threads=job.torch_threads or torch.get_num_threads())
    ray = start_ray(address)
    task = build_registry(list(job.plugin_modules), entry_points=job.entry_points).task(job.task)
    needs = dict(getattr(task, "resources", {}) or {})
    cpus = float(needs.get("cpus", 1))
    gpus = float(gpus_per_worker if gpus_per_worker is not None else needs.get("gpus", 0))
    if job.common.get("device", "cpu").startswith("cuda") and gpus == 0:
        raise ParameterError("--device cuda on Ray needs GPUs for the workers", "pass --gpus-per-worker 1")
    if workers is None:
        available = ray.available_resources()
        workers = max(1, int(available.get("CPU", 1) // max(cpus, 1e-3)))
        if gpus:
            workers = max(1, min(workers, int(available.get("GPU", 0) // gpus)))
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = [{"item": json.dumps(asdict(item))} for item in job.items]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    extra = {"memory": int(needs["memory_gb"] * 2**30)} if needs.get("memory_gb") else {}
    results = dataset.map_batches(
        TaskActor,
        batch_size=4 if getattr(task, "batchable", False) else 1,  # a batchable task gets several inputs a call
        fn_constructor_kwargs={"job": job},
        compute=ray.data.ActorPoolStrategy(size=min(workers, max(1, len(rows)))),
        num_cpus=cpus,
        num_gpus=gpus,
        max_restarts=MAX_RESTARTS,
        max_task_retries=MAX_TASK_RETRIES,
        **extra,
    )
    records: list[dict[str, Any]] = []
    with tqdm(total=len(rows), unit="img", disable=None if progress else True, file=sys.stderr) as bar:
        for row in results.iter_rows():
            records.append(json.loads(row["record"]))
            bar.update(1)
    return records
