"""Test-only plugin: a task whose worker process dies once, mid-job (Ray must retry its input)."""

from __future__ import annotations

import os
from pathlib import Path

from difftool.core.task import Task, TaskResult
from difftool.plugins import hookimpl

_seen = 0


class CrashOnce(Task):
    name = "crash-once"
    summary = "Copies the image; the first worker to reach its third input exits its process"

    def run(self, request, context):
        global _seen
        _seen += 1
        marker = Path(os.environ["DIFFTOOL_TEST_CRASH_MARKER"])
        if _seen == 3 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # a hard kill: no exception, no cleanup
        return TaskResult([request.inputs["image"].to_pil()], {"copied": True})


class CopyBatched(Task):
    name = "copy-batched"
    summary = "Copies the image; batchable, so Ray hands each worker several inputs per call"
    batchable = True

    def run(self, request, context):
        return TaskResult([request.inputs["image"].to_pil()], {"pid": os.getpid()})


@hookimpl
def register_tasks(register):
    register(CrashOnce)
    register(CopyBatched)
