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
from typing import Any

from PIL import Image

from difftool import __version__
from difftool.core import phases
from difftool.core.errors import DifftoolError, ParameterError, PluginError
from difftool.core.images import LoadedImage, open_image
from difftool.core.phases import PhaseCallback
from difftool.core.task import CancelToken, ProgressCallback, RunContext, Task, TaskRequest
from difftool.plan import Plan, param_choices, preflight, validate_params
from difftool.plugins.registry import Registry

__all__ = ["RunResult", "execute", "param_choices", "prepare", "run", "validate_params"]


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


def prepare(task: Task, inputs: Sequence[Any], params: Mapping[str, Any]) -> TaskRequest:
    """Load the inputs and image parameters of one run (``params`` already validated by the preflight)."""
    if len(inputs) != len(task.inputs):
        names = ", ".join(p.name for p in task.inputs)
        raise ParameterError(f"task {task.name!r} takes {len(task.inputs)} input(s) ({names}), got {len(inputs)}")
    kinds = {p.name: p.type for p in task.params}
    values = {
        name: _load(value, f"--{name.replace('_', '-')}")
        if kinds[name] in ("image", "mask") and value is not None
        else value
        for name, value in params.items()
    }
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
    To run many inputs with one check, :func:`difftool.plan.preflight` once and :func:`execute` each.
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
    return execute(plan, *inputs, seed=seed, progress=progress, preview_every=preview_every, cancel=cancel, phase=phase)


def execute(
    plan: Plan,
    *inputs: Any,
    seed: int | None = None,
    progress: ProgressCallback | None = None,
    preview_every: int = 0,
    cancel: CancelToken | None = None,
    phase: PhaseCallback | None = None,
) -> RunResult:
    """Run a preflighted :class:`~difftool.plan.Plan` on ``inputs`` (``phase``: as for :func:`run`)."""
    # A fresh instance per run, as before plans: a plugin task may keep state on ``self``.
    task, instance, registry = plan.task_name, type(plan.task)(), plan.registry
    seed = new_seed() if seed is None else check_seed(seed)
    request = prepare(instance, inputs, plan.params)
    context = RunContext(
        seed=seed,
        backend=plan.backend,
        model=plan.model,
        progress=progress,
        preview_every=preview_every,
        cancel=cancel or CancelToken(),
        registry=registry,
    )
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
