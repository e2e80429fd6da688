"""Folder jobs: plan a batch, process one input (resumably), and write the report.

The same :func:`process_item` (:func:`difftool.app.api.execute` into a :class:`FileSink`) runs in the CLI's
local loop and inside each Ray Data actor, so a distributed run writes the same files as a local one:
outputs are named by the input's relative path, seeds derive from the base seed and that path (never
from processing order), and every output is written atomically with its metadata. An output is *up to
date* when its metadata records the same input hash and job fingerprint (task, parameters, model); a
rerun skips those inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftool.core.atomic import atomic_write_bytes, claim, clean_stale_temps
from difftool.core.errors import DifftoolError, OutputError, OutputExistsError, ParameterError

if TYPE_CHECKING:
    from difftool.app.api import Item, RunResult
    from difftool.app.plan import Plan

REPORT_NAME = "report.jsonl"
log = logging.getLogger("difftool")


@dataclass(frozen=True)
class JobItem:
    """One unit of a job: an input (path or URI; ``None`` for tasks without inputs) and where it goes."""

    source: str | None
    key: str
    outputs: tuple[str, ...]
    seed: int


@dataclass
class FolderJob:
    """Everything a worker needs to process any item of a batch, picklable for Ray."""

    task: str
    items: list[JobItem]
    params: dict[str, Any]
    #: The plan's request fields (``model``, ``backend``, ``device``, ``dtype``, ``backend_options``):
    #: a worker in another process preflights the same plan from them.
    common: dict[str, Any]
    overwrite: bool = False
    #: Where ``report.jsonl`` goes (the output folder), or ``None``.
    report_dir: str | None = None
    #: Plugin module names beyond the built-ins and entry points (workers import them).
    plugin_modules: tuple[str, ...] = ()
    entry_points: bool = True
    #: PyTorch intra-op threads for workers; results depend on it (reduction order), so a distributed
    #: run uses the driver's count to write the same bytes as a local run on the same kind of machine.
    torch_threads: int | None = None
    #: The ``--seed`` the user gave (``None``: random). Part of the fingerprint, so a rerun with another
    #: seed redoes the outputs; a rerun without ``--seed`` keeps the outputs and their recorded seeds.
    explicit_seed: int | None = None
    fingerprint: str = field(default="", init=False)

    def __post_init__(self) -> None:
        plain = {k: str(v) if isinstance(v, Path) else v for k, v in sorted(self.params.items())}
        identity = {"task": self.task, "params": plain, "model": self.common.get("model")}
        if self.explicit_seed is not None:
            identity["seed"] = self.explicit_seed
        payload = json.dumps(identity, default=str)
        self.fingerprint = hashlib.sha256(payload.encode()).hexdigest()[:16]


def plan_job(
    run_plan: Plan,
    *,
    specs: list[str],
    output: str | None,
    base_seed: int,
    overwrite: bool = False,
    count: int = 1,
    seed_given: bool = False,
) -> FolderJob:
    """Expand inputs, name outputs and derive seeds for a preflighted plan; raises a :class:`DifftoolError`.

    Everything that can be checked before the work is: inputs are regular files, no two inputs share
    an output, no output replaces an input, and every output folder can be written.
    """
    from difftool.app.api import derive_seed
    from difftool.app.batch import BatchItem, expand_inputs, output_is_file, output_paths

    task, task_name, registry = run_plan.task, run_plan.task_name, run_plan.registry
    if task.inputs:
        remote = [spec for spec in specs if "://" in spec]
        batch = expand_inputs([spec for spec in specs if "://" not in spec]) if len(remote) < len(specs) else []
        sources: list[str | None] = [str(item.path) for item in batch]
        if remote:
            if output is None:
                raise ParameterError("inputs given as URIs need an output folder", "pass -o FOLDER")
            for uri, key in expand_uris(remote):
                batch.append(BatchItem(Path(key), key))
                sources.append(uri)
        keys = [item.key for item in batch]
        if len(set(keys)) != len(keys):
            raise ParameterError("two inputs would write the same output name", "run them separately")
        targets = output_paths(batch, output, task_name, count=len(task.outputs))
        own = own_outputs(sources, targets, task_name)
        if own:  # a rerun beside the inputs finds the last run's outputs among them: they are not inputs
            log.info("skipped %d output(s) of an earlier run among the inputs, e.g. %s", len(own), sources[min(own)])
            batch = [item for i, item in enumerate(batch) if i not in own]
            sources = [source for i, source in enumerate(sources) if i not in own]
            targets = output_paths(batch, output, task_name, count=len(task.outputs))
        seeds = [base_seed if len(batch) == 1 else derive_seed(base_seed, item.key) for item in batch]
    else:
        if specs:
            raise ParameterError(f"task {task_name!r} takes no input files, got {specs[0]!r}", "drop them")
        seeds = [base_seed + i for i in range(count)]
        batch = [BatchItem(Path(f"{task_name}-{seed}.png"), f"{task_name}-{seed}") for seed in seeds]
        targets = output_paths(batch, output, task_name, count=len(task.outputs), generated=True)
        sources = [None] * len(batch)
    items = [
        JobItem(source, item.key, tuple(str(p) for p in paths), seed)
        for source, item, paths, seed in zip(sources, batch, targets, seeds, strict=True)
    ]
    sources_set = {Path(src).resolve() for src in sources if src is not None and "://" not in src}
    for paths in targets:
        clash = next((p for p in paths if p.resolve() in sources_set), None)
        if clash is not None:
            raise ParameterError(f"the output {clash} would overwrite an input", "pass -o to another file or folder")
    report_dir = None
    if output is not None and not output_is_file(output):
        report_dir = str(Path(output).expanduser())
    folders = sorted({p.parent for paths in targets for p in paths} | ({Path(report_dir)} if report_dir else set()))
    for folder in folders:
        check_writable(folder)
    stale = [p for folder in folders for p in clean_stale_temps(folder)]
    if stale:
        log.info("removed %d temp file(s) left by an interrupted run, e.g. %s", len(stale), stale[0])
    return FolderJob(
        task_name,
        items,
        job_params(run_plan),
        run_plan.request_fields(),
        overwrite=overwrite,
        report_dir=report_dir,
        plugin_modules=tuple(getattr(registry, "plugin_modules", ())),
        entry_points=bool(getattr(registry, "entry_points", True)),
        explicit_seed=base_seed if seed_given else None,
    )


def own_outputs(sources: list[str | None], targets: list[list[Path]], task_name: str) -> set[int]:
    """Indices of inputs that are this job's outputs: each lies where the job writes another input's output
    and carries difftool's record of this task made from that input (its hash, or its file name when the
    input changed since). A user's file at such a place carries no such record and stays an input (the
    job then refuses to overwrite it)."""
    from difftool.core.atomic import file_sha256
    from difftool.core.images import read_metadata

    made_by = {path.resolve(): j for j, paths in enumerate(targets) for path in paths}
    own = set()
    for i, source in enumerate(sources):
        j = made_by.get(Path(source).resolve()) if source is not None and "://" not in source else None
        made_from = sources[j] if j is not None and j != i else None
        if source is None or made_from is None:
            continue
        try:
            record = read_metadata(source).get("difftool", {})
        except DifftoolError:
            continue
        if not isinstance(record, dict) or record.get("task") != task_name:
            continue
        recorded = str(record.get("input") or "")
        if Path(recorded).name == Path(made_from).name or record.get("input_sha256") == file_sha256(Path(made_from)):
            own.add(i)
    return own


def job_params(run_plan: Plan) -> dict[str, Any]:
    """The plan's parameters (``None`` left out), for workers and the job fingerprint.

    Choices are kept as text (``"4"``, as the command line gives them), so a typed choice does not
    change the fingerprint of outputs an earlier version made: a rerun still finds them up to date.
    """
    kinds = {p.name: p.type for p in run_plan.task.params}
    return {k: str(v) if kinds[k] == "choice" else v for k, v in run_plan.params.items() if v is not None}


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be made in it (an :class:`OutputError` if not).

    The probe is a file this call creates (``O_EXCL``) and removes at once; nothing else is touched.
    """
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".difftool-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"cannot write to {folder}: {reason}", "pass -o to a folder you can write to") from None


def expand_uris(uris: list[str]) -> list[tuple[str, str]]:
    """``(uri, key)`` for each image under URI folders (recursively) or URI files, via pyarrow's filesystems."""
    from pyarrow import fs

    from difftool.app.batch import IMAGE_SUFFIXES
    from difftool.core.errors import ImageError

    found = []
    for uri in uris:
        try:
            filesystem, root = fs.FileSystem.from_uri(uri)
            info = filesystem.get_file_info(root)
        except (OSError, ValueError) as exc:
            raise ImageError(
                f"{uri}: cannot be read ({exc})", "check the URI and its filesystem's credentials"
            ) from None
        if info.type == fs.FileType.File:
            found.append((uri, Path(root).name))
        elif info.type == fs.FileType.Directory:
            selector = fs.FileSelector(root, recursive=True)
            files = sorted(
                f.path
                for f in filesystem.get_file_info(selector)
                if f.type == fs.FileType.File and Path(f.path).suffix.lower() in IMAGE_SUFFIXES
            )
            if not files:
                raise ImageError(f"{uri}: the folder holds no images", f"use {', '.join(sorted(IMAGE_SUFFIXES))} files")
            base = uri.rstrip("/")
            for path in files:
                key = Path(path).relative_to(root).as_posix()
                found.append((f"{base}/{key}", key))
        else:
            raise ImageError(f"{uri}: no such file", "check the URI")
    return found


def read_source(source: str) -> bytes:
    """The bytes of a local path or of any URI pyarrow's filesystems read (``s3://``, ``gs://``, ...)."""
    if "://" not in source:
        from difftool.core.images import check_regular_file

        check_regular_file(Path(source))  # never block on a FIFO; bounded size
        return Path(source).read_bytes()
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(source)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def up_to_date(job: FolderJob, item: JobItem, input_sha256: str | None) -> bool | None:
    """``True``: every output exists from this input and job; ``None``: none exists; ``False``: a foreign file."""
    from difftool.core.images import read_metadata

    existing = [Path(p) for p in item.outputs if Path(p).exists()]
    if not existing:
        return None
    for path in existing:
        try:
            record = read_metadata(path).get("difftool", {})
        except DifftoolError:
            return False
        if record.get("job") != job.fingerprint or record.get("input_sha256") != input_sha256:
            return False
    return len(existing) == len(item.outputs)


def recorded_seed(item: JobItem, default: int) -> int:
    """The seed an existing output was made with (its metadata), so a resumed run reports the truth."""
    from difftool.core.images import read_metadata

    try:
        return int(read_metadata(item.outputs[0]).get("difftool", {}).get("seed", default))
    except (DifftoolError, TypeError, ValueError):
        return default


class FileSink:
    """A folder job's input as files on disk: claimed among processes, skipped when up to date, each output
    written atomically with its metadata; :attr:`record` is its line of the report."""

    def __init__(self, job: FolderJob, item: JobItem, progress: Any = None, *, raise_errors: bool = False) -> None:
        self.job, self.item, self._progress, self.raise_errors = job, item, progress, raise_errors
        self.digest: str | None = None  # the input's sha256 (``None``: a task without inputs)
        self._claim = contextlib.ExitStack()
        self._started = time.perf_counter()
        self.record: dict[str, Any] = {
            "input": item.source,
            "key": item.key,
            "outputs": list(item.outputs),
            "seed": item.seed,
            "worker": f"{socket.gethostname()}:{os.getpid()}",
        }

    def started(self, run: Item) -> bool:
        job, item = self.job, self.item
        if not self._claim.enter_context(claim(item.outputs[0])):
            # another process (a concurrent run on the same folder) is making it right now
            return self._skip(reason="being made by another difftool process")
        state = up_to_date(job, item, self.digest)  # checked under the claim: a finished claimant's file counts
        if state and not job.overwrite:
            return self._skip(seed=recorded_seed(item, item.seed))
        if state is False and not job.overwrite:
            first = next(p for p in item.outputs if Path(p).exists())
            raise OutputExistsError(
                f"{first} exists and was not made from this input with these parameters",
                "pass --overwrite to replace it or -o another folder",
            )
        return True

    def _skip(self, **fields: Any) -> bool:
        self._claim.close()
        self._done(status="skipped", **fields)
        return False

    def progress(self, step: int, total: int, preview: Any) -> None:
        if self._progress is not None:
            self._progress(step, total, preview)

    def finished(self, run: Item, result: RunResult) -> None:
        from difftool.core.images import save_image

        with self._claim:
            meta = {**result.record, "input": self.item.source, "job": self.job.fingerprint}
            if self.digest is not None:
                meta["input_sha256"] = self.digest
            for image, path in zip(result.images, self.item.outputs, strict=True):
                save_image(image, path, meta)
        self._done(status="ok")

    def failed(self, run: Item | None, error: BaseException) -> None:
        """The user's errors go in the record (``raise_errors``: raised); anything else is raised."""
        self._claim.close()
        if self.raise_errors or not isinstance(error, (DifftoolError, OSError)):
            raise error
        self._done(status="failed", error=str(error), error_type=type(error).__name__)

    def _done(self, **fields: Any) -> None:
        self.record.update(fields, seconds=round(time.perf_counter() - self._started, 3))


def process_item(
    job: FolderJob, item: JobItem, run_plan: Plan, progress: Any = None, *, raise_errors: bool = False
) -> dict[str, Any]:
    """Run one input of ``job`` with its preflighted plan through a :class:`FileSink`; returns its record.

    The user's errors go in the record (``raise_errors``: raised).
    """
    from difftool.app import api

    sink = FileSink(job, item, progress, raise_errors=raise_errors)
    try:
        data = read_source(item.source) if item.source is not None else None
    except (DifftoolError, OSError) as error:
        sink.failed(None, error)
        return sink.record
    sink.digest = hashlib.sha256(data).hexdigest() if data is not None else None
    api.execute(run_plan, (data,) if data is not None else (), [item.seed], sink)
    return sink.record


def write_report(job: FolderJob, records: list[dict[str, Any]]) -> Path | None:
    """``report.jsonl`` in the output folder: one line per input, in input order; written atomically."""
    if job.report_dir is None:
        return None
    order = {item.key: i for i, item in enumerate(job.items)}
    lines = [json.dumps(r, sort_keys=True) for r in sorted(records, key=lambda r: order.get(r["key"], 0))]
    path = Path(job.report_dir) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def summary(job: FolderJob, records: list[dict[str, Any]], executor: str, seconds: float) -> dict[str, Any]:
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "failed")}
    return {
        "task": job.task,
        "executor": executor,
        "inputs": len(job.items),
        **counts,
        "seconds": round(seconds, 2),
        "failed_inputs": [r["key"] for r in records if r["status"] == "failed"],
        "results": records,
    }
