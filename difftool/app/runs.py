"""A task run on files: what ``difftool run`` does once it has parsed its options.

Preflight the request, plan the folder job (inputs, outputs, seeds), run it on an executor and write its
report; every failure comes back as a one-line :class:`~difftool.core.errors.DifftoolError`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from difftool.core.errors import DifftoolError, OutputError

if TYPE_CHECKING:
    from difftool.core.task import RegistryView


def run_files(
    task_name: str,
    specs: list[str],
    *,
    output: str | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    count: int = 1,
    request: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    executor: str = "local",
    ray_options: Mapping[str, Any] | None = None,
    registry: RegistryView | None = None,
) -> dict[str, Any]:
    """Run ``task_name`` on the files, folders, globs or URIs ``specs``; returns
    :func:`difftool.app.folder_jobs.summary`.

    ``request``: ``model``, ``backend``, ``device``, ``dtype``, ``backend_options``. One input: its error is
    raised; several: each failure is in its record and the job goes on.
    """
    from difftool.app import api
    from difftool.app import folder_jobs as jobs
    from difftool.app.plan import preflight

    try:
        plan = preflight(task_name, registry=registry, params=params, **dict(request or {}))
        job = jobs.plan_job(
            plan,
            specs=specs,
            output=output,
            base_seed=api.new_seed() if seed is None else seed,
            overwrite=overwrite,
            count=count,
            seed_given=seed is not None,
        )
    except OSError as error:  # the filesystem changed under the planning (a concurrent run, a removed folder)
        raise OutputError(f"cannot prepare the job: {error}", "check the input and output paths") from error
    started = time.perf_counter()
    if executor == "ray":
        from difftool.app.executors.ray_data import run_on_ray

        records = run_on_ray(job, **dict(ray_options or {}))
    else:
        from difftool.app.executors.local import run_local

        try:
            records = run_local(job, plan)
        except OSError as error:
            raise DifftoolError(str(error), "check the path and free disk space") from error
    try:
        jobs.write_report(job, records)
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputError(f"cannot write {jobs.REPORT_NAME}: {reason}", "check the output folder") from error
    return jobs.summary(job, records, executor, time.perf_counter() - started)
