"""The Task interface: a declared unit of work (parameters, inputs, outputs) and how it runs.

The declaration is data: the CLI builds its options from :attr:`Task.params`, the GUI its forms,
the API validates keyword arguments with it. No task writes its own CLI.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar, runtime_checkable

from difftool.core.errors import Cancelled
from difftool.core.params import ExportShapes, Param, Params

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from difftool.core.backend import Backend, ResolvedBackend
    from difftool.core.denoiser import Denoiser
    from difftool.core.exporter import ExportTarget
    from difftool.core.models import ModelEntry
    from difftool.core.scheduler import Scheduler

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered thing (a task class, a backend, an exporter, a scheduler, ...) and the plugin that
    registered it: every kind a registry holds has this shape."""

    value: T
    plugin: str


@runtime_checkable
class RegistryView(Protocol):
    """What tasks and front ends ask of a registry: a run's :attr:`RunContext.registry`, the CLI's, the GUI's.

    :class:`difftool.plugins.registry.Registry` implements it from the installed plugins; the desktop app's
    :class:`difftool.gui.remote.RemoteRegistry` from a server's ``/v1`` API. Tasks use the lookups, never how
    the plugins were loaded.
    """

    @property
    def tasks(self) -> Mapping[str, Entry[Any]]: ...
    @property
    def backends(self) -> Mapping[str, Entry[Any]]: ...
    @property
    def schedulers(self) -> Mapping[str, Any]: ...
    @property
    def preprocessors(self) -> Mapping[str, Any]: ...
    @property
    def plugins(self) -> Mapping[str, Any]: ...
    @property
    def failures(self) -> Sequence[Any]: ...

    def task(self, name: str) -> Task:
        """A fresh instance of task ``name`` (a one-line error naming the known ones if there is none)."""
        ...

    def task_plugin(self, name: str) -> str: ...

    def backend(self, name: str) -> Backend: ...

    def make_scheduler(self, name: str, config: Mapping[str, Any]) -> Scheduler: ...

    def find_models(self) -> list[ModelEntry]: ...

    def delegated_families(self, task: str) -> tuple[str, ...]:
        """The model families registered families (``register_families``) run ``task`` for."""
        ...

    def family_for(self, path: Any, task: str) -> Any:
        """The registered :class:`~difftool.core.family.ModelFamily` that runs ``task`` for the model at
        ``path``, or ``None``."""
        ...

    def preprocessor(self, name: str) -> Any: ...


@dataclass(frozen=True)
class Port:
    """A declared input or output: its name, kind (``image``, ``mask``, ...) and help text."""

    name: str
    kind: Literal["image", "mask", "text", "path"] = "image"
    help: str = ""


class CancelToken:
    """Thread-safe cancellation flag; the sampler checks it before every step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled()


#: ``progress(step, total, preview)``; ``preview`` is a PIL image on preview steps, else ``None``.
ProgressCallback = Callable[[int, int, "Image.Image | None"], None]


@dataclass
class RunContext:
    """Everything a task run needs besides its inputs: where and how to run, and how to report.

    ``backend`` is the request's :class:`~difftool.core.backend.ResolvedBackend`: the backend already
    checked for the run's device, with its options. Tasks never look a backend up by name.
    """

    #: Schedulers, models and other tasks are looked up here.
    registry: RegistryView = field(kw_only=True, repr=False)
    seed: int = 0
    backend: ResolvedBackend | None = None
    model: str | None = None
    progress: ProgressCallback | None = None
    #: Decode a preview every this many steps (0: never); previews cost a decode, so opt in.
    preview_every: int = 0
    cancel: CancelToken = field(default_factory=CancelToken)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("difftool"))
    #: Denoisers this run made (the API records their precision and artifact fingerprint).
    denoisers: list[Any] = field(default_factory=list)
    #: The task's declared export shapes for this request (backends that build engines use them).
    export_shapes: ExportShapes | None = None
    #: Metadata found while running (the embeddings a prompt named): merged into the run's record.
    notes: dict[str, Any] = field(default_factory=dict)
    #: ``task_runner(name, inputs, **params)``: runs another task; injected by the API (core does not import
    #: it). Call :meth:`run_task`.
    task_runner: Callable[..., Any] | None = field(default=None, repr=False)
    _generator: Any = field(default=None, init=False, repr=False)

    @property
    def device(self) -> str:
        return self.backend.device if self.backend is not None else "cpu"

    @property
    def dtype(self) -> str:
        return self.backend.dtype if self.backend is not None else "fp32"

    @property
    def backend_name(self) -> str:
        return self.backend.name if self.backend is not None else "torch"

    @property
    def torch_device(self) -> torch.device:
        """Where this run's tensors live (ask this, not ``torch.device(context.device)``)."""
        from difftool.core.cuda import runtime

        return runtime().placement(self.device)

    @property
    def generator(self) -> torch.Generator:
        """A CPU generator seeded with :attr:`seed`, shared by the whole run (created on first use)."""
        if self._generator is None:
            import torch

            self._generator = torch.Generator("cpu").manual_seed(self.seed)
        return self._generator

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype]

    def run_task(self, name: str, inputs: Sequence[Any], **params: Any) -> Any:
        """Run the registered task ``name`` on ``inputs`` with ``params`` (``model=`` picks its model) through
        the API's preflight and execute: its parameters are validated and defaulted as a user's would be (a bad
        value raises the one-line ``ParameterError``). It runs on this run's backend, seed, progress and cancel
        token and returns a :class:`difftool.app.api.RunResult`."""
        if self.task_runner is None:
            raise RuntimeError("this RunContext runs no other tasks; run tasks through difftool.app.api")
        return self.task_runner(name, inputs, **params)

    def report(self, step: int, total: int, preview: Image.Image | None = None) -> None:
        if self.progress is not None:
            self.progress(step, total, preview)

    def make_scheduler(self, name: str, config: Mapping[str, Any]) -> Scheduler:
        """A fresh scheduler ``name`` for a model trained with noise schedule ``config``."""
        return self.registry.make_scheduler(name, config)

    def make_denoiser(
        self,
        module: Any,
        *,
        prediction_type: str,
        model_id: str = "",
        shapes: ExportShapes | None = None,
    ) -> Denoiser:
        """Wrap a torch module for the resolved backend (its device, dtype and options).

        ``shapes`` overrides the task's declared :attr:`export_shapes` for this denoiser.
        """
        denoiser = self.resolved_backend().make_denoiser(
            module, prediction_type=prediction_type, model_id=model_id, shapes=shapes or self.export_shapes
        )
        self.denoisers.append(denoiser)
        return denoiser

    def resolved_backend(self) -> ResolvedBackend:
        """:attr:`backend`, or an error if this context was built without one (not by the preflight)."""
        if self.backend is None:
            raise RuntimeError("this RunContext has no backend; build it with difftool.app.plan.preflight")
        return self.backend


@dataclass
class TaskRequest:
    """Validated inputs and parameters of one run (images already loaded).

    ``params`` holds every declared parameter, typed, defaults applied: read ``request.params.steps``.
    """

    inputs: dict[str, Any]
    params: Params
    #: The task's model as the preflight resolved it (a :class:`~difftool.core.models.ModelRef`; ``None``: the
    #: task's default), so :meth:`Task.export_shapes` can declare what the run will ask of it.
    model: str | None = None


@dataclass
class TaskResult:
    """A run's output images and the record written into their metadata."""

    images: list[Image.Image]
    record: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A unit of work. Subclasses declare the class attributes and implement :meth:`run`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    inputs: ClassVar[tuple[Port, ...]] = (Port("image", "image", "the image to process"),)
    outputs: ClassVar[tuple[Port, ...]] = (Port("image", "image", "the result"),)
    #: Whether the task loads a model (the CLI then offers ``--model``).
    uses_model: ClassVar[bool] = False
    #: The families of listed models (:attr:`ModelEntry.family`) this task runs; ``None``: any. Model
    #: pickers offer only these (a path given by hand is still checked by the task itself).
    model_families: ClassVar[tuple[str, ...] | None] = None
    #: Values of ``--model`` that name no file but a model the task knows (superres' ``difftool``): the
    #: preflight resolves every other value (:meth:`difftool.plugins.registry.Registry.resolve_model`).
    model_keywords: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`export_target` offers a network (``difftool export`` lists the task): declared, so no
    #: one finds it out by comparing methods.
    exports: ClassVar[bool] = False
    #: What one worker running this task needs (distributed executors reserve it): ``cpus``, ``gpus``
    #: (with ``--device cuda``), ``memory_gb``.
    resources: ClassVar[dict[str, float]] = {"cpus": 1}
    #: Whether a distributed executor may hand one worker several inputs per call (Ray Data batches of 4
    #: instead of 1: fewer calls for fast tasks). Each input is still one :meth:`run`.
    batchable: ClassVar[bool] = False

    @classmethod
    def accepts_family(cls, family: str) -> bool:
        """Whether a listed model of ``family`` is one this task runs (see :attr:`model_families`)."""
        return cls.uses_model and (cls.model_families is None or family in cls.model_families)

    def availability(self, model: str | None) -> str | None:
        """``None`` if the task can run with ``model`` (``None``: the default one), else why not and the fix."""
        return None

    def check(self, params: Params) -> None:
        """Raise a one-line error for what the declaration cannot say: cross-field rules (superres's ``overlap``
        below ``tile``) and the work a request may ask for (a prompt's length in tokens). The preflight calls it
        once, with the validated parameters, before any model loads."""
        return None

    def output_size(self, params: Params, inputs: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
        """The largest (width, height) one output can have for these validated ``params`` and the sizes of the
        image inputs, before any model loads (a server bounds a request's work with it). Default: the first
        input's size; ``None``: nothing to bound by."""
        return inputs[0] if inputs else None

    def check_backend(self, params: Mapping[str, Any], backend: ResolvedBackend) -> None:
        """Raise a one-line error if ``backend`` cannot run these (validated) ``params``; the preflight
        calls it once, before any model loads (e.g. a parameter that needs a capability the backend lacks)."""
        return None

    def export_target(self, model: str | None) -> ExportTarget | None:
        """The network ``difftool export FORMAT TASK`` exports for ``model`` (``None``: nothing to export);
        a task that overrides it declares :attr:`exports`."""
        return None

    def export_shapes(self, request: TaskRequest) -> ExportShapes | None:
        """The shapes this loaded request will send the denoiser (``None``: the backend's defaults)."""
        return None

    @abstractmethod
    def run(self, request: TaskRequest, context: RunContext) -> TaskResult:
        """Do the work; report progress through ``context`` and stop when ``context.cancel`` is set."""

    @classmethod
    def param(cls, name: str) -> Param:
        for p in cls.params:
            if p.name == name:
                return p
        raise KeyError(name)
