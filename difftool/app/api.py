"""The Python API: ``difftool.run("superres", "in.png", scale=4).image.save("out.png")``.

The CLI and the GUI call these same functions.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from difftool import __version__
from difftool.app.plan import Plan, param_choices, preflight, validate_params
from difftool.core import phases
from difftool.core.errors import DifftoolError, ParameterError, PluginError
from difftool.core.images import LoadedImage, open_image
from difftool.core.params import Params
from difftool.core.phases import PhaseCallback
from difftool.core.task import CancelToken, ProgressCallback, RunContext, Task, TaskRequest
from difftool.plugins.registry import Registry

__all__ = ["Item", "RunResult", "Sink", "execute", "param_choices", "prepare", "run", "run_plan", "validate_params"]


@dataclass
class RunResult:
    """Output images and the record of how they were made (also written into PNG metadata)."""

    images: list[Image.Image]
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def image(self) -> Image.Image:
        return self.images[0]


def new_seed() -> int:
    return secrets.randbelow(2**31)


def derive_seed(base: int, key: str) -> int:
    """A per-input seed from the run's base seed and the input's relative path (not its position).

    A name that is not UTF-8 (``b"\\xff.png"`` on Linux: Python holds it with lone surrogates) is hashed as
    its bytes on disk (``surrogateescape``), so it gets a seed like any other name."""
    digest = hashlib.sha256(f"{base}:{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


#: The seeds a run takes: what ``torch.Generator.manual_seed`` takes, and the CLI's ``--seed`` range.
MAX_SEED = 2**63 - 1


def check_seed(seed: Any) -> int:
    """``seed`` as an int in 0..:data:`MAX_SEED` (an int, or a string of one), or a one-line ParameterError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, str)):
        raise ParameterError(f"seed {seed!r} is not an integer", f"pass an integer from 0 to {MAX_SEED}")
    try:
        value = int(seed)
    except ValueError:
        raise ParameterError(f"seed {seed!r} is not an integer", f"pass an integer from 0 to {MAX_SEED}") from None
    if not 0 <= value <= MAX_SEED:
        raise ParameterError(f"seed {value} is outside 0..{MAX_SEED}", f"pass an integer from 0 to {MAX_SEED}")
    return value


def _load(value: Any, what: str) -> LoadedImage:
    if isinstance(value, LoadedImage):
        return value
    if isinstance(value, (str, Path, bytes, bytearray, Image.Image)):
        return open_image(value)
    raise ParameterError(f"{what}: expected an image path, bytes or PIL image, got {type(value).__name__}")


def task_inputs(task: Task, inputs: Sequence[Any] | Mapping[str, Any]) -> list[Any]:
    """``inputs`` in the task's declared order (given in order, or by name), or a one-line ParameterError."""
    names = ", ".join(p.name for p in task.inputs) or "none"
    if isinstance(inputs, Mapping):
        if set(inputs) != {p.name for p in task.inputs}:
            raise ParameterError(f"task {task.name!r} takes the inputs: {names}", f"send exactly {names}")
        inputs = [inputs[p.name] for p in task.inputs]
    if len(inputs) != len(task.inputs):
        raise ParameterError(f"task {task.name!r} takes {len(task.inputs)} input(s) ({names}), got {len(inputs)}")
    return list(inputs)


def prepare(task: Task, inputs: Sequence[Any], params: Params) -> TaskRequest:
    """Load the inputs and image parameters of one run (``params`` validated by the preflight: a
    :class:`~difftool.core.params.Params`, whose image parameters are replaced by the loaded images)."""
    inputs = task_inputs(task, inputs)
    images = {p.name for p in task.params if p.type in ("image", "mask") and params[p.name] is not None}
    values = params.replace(**{name: _load(params[name], f"--{name.replace('_', '-')}") for name in images})
    loaded = {
        port.name: _load(value, port.name) if port.kind in ("image", "mask") else value
        for port, value in zip(task.inputs, inputs, strict=True)
    }
    return TaskRequest(loaded, values)


def _plain(value: Any) -> Any:
    if isinstance(value, LoadedImage):
        return str(value.path) if value.path else "<image>"
    if isinstance(value, Path):
        return str(value)
    return value


def run(
    task: str,
    *inputs: Any,
    model: str | None = None,
    backend: str = "torch",
    device: str = "cpu",
    dtype: str = "auto",
    backend_options: Mapping[str, Any] | None = None,
    seed: int | None = None,
    progress: ProgressCallback | None = None,
    preview_every: int = 0,
    cancel: CancelToken | None = None,
    registry: Registry | None = None,
    phase: PhaseCallback | None = None,
    **params: Any,
) -> RunResult:
    """Run ``task`` on ``inputs`` (paths, bytes or PIL images) with task ``params``.

    Raises a :class:`~difftool.core.errors.DifftoolError` subclass with a one-line message for anything
    the caller can fix; a task's unexpected exception comes back as a ``PluginError`` naming its plugin.
    To run many inputs with one check, :func:`difftool.app.plan.preflight` once and :func:`execute` each.
    ``phase(what, done, total)`` hears what the run does between steps (loading a model, exporting).
    """
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise ParameterError(
            f"model {model!r} ({type(model).__name__}) is not a model name or path", "pass model='NAME' or a path"
        )
    seed = None if seed is None else check_seed(seed)  # before any model loads
    plan = preflight(
        task,
        model=model,
        backend=backend,
        device=device,
        dtype=dtype,
        backend_options=backend_options,
        params=params,
        registry=registry,
    )
    return run_plan(
        plan, *inputs, seed=seed, progress=progress, preview_every=preview_every, cancel=cancel, phase=phase
    )


@dataclass(frozen=True)
class Item:
    """One run of :func:`execute`: which of its seeds (``index``) and the seed."""

    index: int
    seed: int


class Sink(Protocol):
    """Where :func:`execute` reports its runs: files on disk (:class:`difftool.app.folder_jobs.FileSink`), PNG bytes
    for a server (:class:`difftool.serve.sink.PngSink`) or Qt signals (:class:`difftool.gui.job_queue.QtSink`)."""

    def started(self, item: Item) -> bool:
        """Before ``item`` runs; ``False`` skips it (its outputs are up to date, or another process makes them)."""

    def progress(self, step: int, total: int, preview: Image.Image | None) -> None:
        """A sampling step of the running item (``preview``: a decoded image on preview steps)."""

    def finished(self, item: Item, result: RunResult) -> None:
        """``item`` ran: keep its ``result``."""

    def failed(self, item: Item | None, error: BaseException) -> None:
        """``item`` (or the sink itself) raised ``error``; the sink records it or raises. :func:`execute` stops.
        ``item`` is ``None`` for a failure before any run (a front end's preflight, an unreadable input)."""


def execute(
    plan: Plan,
    inputs: Sequence[Any],
    seeds: Sequence[int],
    sink: Sink,
    *,
    preview_every: int = 0,
    cancel: CancelToken | None = None,
    phase: PhaseCallback | None = None,
) -> bool:
    """Run ``plan`` on ``inputs`` once per seed (SEED, SEED+1, ... for a batch), reporting to ``sink``.

    The one loop every front end runs: the CLI's folder jobs, the server, its Ray replicas and the GUI.
    Returns whether every run finished; the first failure goes to ``sink.failed`` and ends the loop.
    """
    for index, seed in enumerate(seeds):
        item = Item(index, seed)
        try:
            if sink.started(item) is False:
                continue
            result = run_plan(
                plan,
                *inputs,
                seed=seed,
                progress=sink.progress,
                preview_every=preview_every,
                cancel=cancel,
                phase=phase,
            )
            sink.finished(item, result)
        except BaseException as error:
            sink.failed(item, error)
            if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: never swallowed
                raise
            return False
    return True


def run_plan(
    plan: Plan,
    *inputs: Any,
    seed: int | None = None,
    progress: ProgressCallback | None = None,
    preview_every: int = 0,
    cancel: CancelToken | None = None,
    phase: PhaseCallback | None = None,
) -> RunResult:
    """Run a preflighted :class:`~difftool.app.plan.Plan` on ``inputs`` (``phase``: as for :func:`run`)."""
    # A fresh instance per run, as before plans: a plugin task may keep state on ``self``.
    task, instance, registry = plan.task_name, type(plan.task)(), plan.registry
    seed = new_seed() if seed is None else check_seed(seed)
    request = prepare(instance, inputs, plan.params)
    request.model = plan.model  # export_shapes declares against the resolved model (SDXL: 1024 px)
    context = RunContext(
        seed=seed,
        backend=plan.backend,
        model=plan.model,
        progress=progress,
        preview_every=preview_every,
        cancel=cancel or CancelToken(),
        registry=registry,
    )
    context.task_runner = _TaskRunner(plan, context)
    try:
        context.cancel.raise_if_cancelled()
        context.export_shapes = instance.export_shapes(request)
        with phases.listening(phase):
            result = instance.run(request, context)
        context.cancel.raise_if_cancelled()  # a cancel during the last step or the decode: nothing is returned to save
    except DifftoolError:
        raise
    except OSError as exc:  # a file, folder, permission or disk problem: the user's to fix, not a plugin bug
        where = f" ({exc.filename})" if exc.filename else ""
        detail = exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DifftoolError(
            f"task {task!r} failed: {detail}{where}",
            "check that path, its permissions and the free disk space (--debug shows the traceback)",
        ) from exc
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise PluginError(
            f"task {task!r} (plugin {plan.plugin}) failed: {type(exc).__name__}: {detail}",
            "run with --debug for the traceback and report it to the plugin's author",
        ) from exc
    if len(result.images) != len(instance.outputs):
        raise PluginError(
            f"task {task!r} (plugin {plan.plugin}) returned {len(result.images)} image(s) "
            f"but declares {len(instance.outputs)} output(s)",
            "report it to the plugin's author",
        )
    record = {
        "task": task,
        **{k: _plain(v) for k, v in request.params.items() if v is not None},  # loaded images: path or "<image>"
        "seed": seed,
        "backend": plan.backend.name,
        "device": plan.backend.device,
        "dtype": plan.backend.dtype,
        **({"backend_options": plan.backend.record()} if plan.backend.record() else {}),
        "difftool_version": __version__,
        **result.record,
        **context.notes,
    }
    if context.denoisers:
        denoiser = context.denoisers[-1]
        record["precision"] = str(denoiser.dtype).replace("torch.", "")
        # Every exported network the run used (a base and its refiner: two), first used first.
        prints = [f for f in dict.fromkeys(getattr(d, "fingerprint", None) for d in context.denoisers) if f]
        if prints:
            record["artifact"] = ", ".join(prints)
    scheduler = registry.schedulers.get(str(record.get("scheduler")))
    if scheduler is not None:
        record["scheduler_label"] = scheduler.label  # A1111's name, for the "Sampler:" metadata field
    return RunResult(result.images, record)


class _TaskRunner:
    """``context.run_task``: another task preflighted on the running plan's backend, then executed with the
    running context's seed, progress, previews and cancel token (a task composes others through the API)."""

    def __init__(self, plan: Plan, context: RunContext) -> None:
        self.plan, self.context = plan, context
        self.result: RunResult | None = None

    def __call__(self, name: str, inputs: Sequence[Any], *, model: str | None = None, **params: Any) -> RunResult:
        entry = self.plan.registry.tasks.get(name)
        fields = self.plan.request_fields() if entry is not None and entry.value.uses_model else {}
        plan = preflight(name, registry=self.plan.registry, params=params, **{**fields, "model": model})
        context = self.context
        execute(plan, inputs, [context.seed], self, preview_every=context.preview_every, cancel=context.cancel)
        assert self.result is not None
        return self.result

    # The sink: results come back to the caller; errors are the caller's.
    def started(self, item: Item) -> bool:
        self.result = None
        return True

    def progress(self, step: int, total: int, preview: Image.Image | None) -> None:
        self.context.report(step, total, preview)

    def finished(self, item: Item, result: RunResult) -> None:
        self.result = result

    def failed(self, item: Item, error: BaseException) -> None:
        raise error
