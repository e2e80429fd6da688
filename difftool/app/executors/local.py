"""The one-process executor: a folder job's items in order, in this process, with progress bars."""

from __future__ import annotations

import sys
from typing import Any

from difftool.app.batch import shown
from difftool.app.folder_jobs import FolderJob, process_item
from difftool.app.plan import Plan
from difftool.core import phases


def run_local(job: FolderJob, run_plan: Plan) -> list[dict[str, Any]]:
    """The one-process executor: items in order, a step bar per item and an overall bar."""
    from tqdm import tqdm

    records: list[dict[str, Any]] = []
    overall = tqdm(total=len(job.items), unit="img", disable=None if len(job.items) > 1 else True, file=sys.stderr)
    for item in job.items:
        bar = tqdm(desc=shown(item.key), unit="step", leave=False, disable=None, file=sys.stderr)

        def progress(step: int, total: int, preview: Any, bar: Any = bar, key: str = shown(item.key)) -> None:
            if getattr(bar, "desc", key) != key:
                bar.set_description_str(key)  # sampling now: the load or export phase is over
            bar.total = total
            bar.update(step - bar.n)

        def phase(what: str, done: Any, total: Any, bar: Any = bar, key: str = shown(item.key)) -> None:
            bar.set_description_str(f"{key}: {what}")  # loading a model or exporting: named on the bar

        try:
            with phases.listening(phase):
                record = process_item(job, item, run_plan, progress, raise_errors=len(job.items) == 1)
        finally:
            bar.close()
        if record["status"] == "failed" and len(job.items) > 1:
            tqdm.write(shown(f"Error: {item.key}: {record['error']}"), file=sys.stderr)
        records.append(record)
        overall.update(1)
    overall.close()
    return records
