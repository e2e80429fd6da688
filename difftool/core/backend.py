"""Backends turn a model into a :class:`~difftool.core.denoiser.Denoiser` that runs on some engine.

A backend that cannot run here says why through :meth:`Backend.unavailable_reason` (like a driver
check) instead of failing half-way through a job. Backends load their engines lazily.

A backend declares its options as :class:`~difftool.core.task.Param` s, like a task's parameters:
the CLI offers them as ``--backend-opt NAME=VALUE``, ``difftool backends`` and the GUI list them.
:meth:`Backend.resolve` checks a backend once for a device, dtype and options and returns the
:class:`ResolvedBackend` that a run carries down to the task; nothing looks a backend up again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from difftool.core.errors import BackendUnavailableError, ParameterError

if TYPE_CHECKING:
    import torch

    from difftool.core.denoiser import Denoiser
    from difftool.core.task import ExportShapes, Param


class Backend(ABC):
    """A named way to run denoisers (``torch``, ``onnx``, ``tensorrt``, ...)."""

    name: str
    summary: str = ""
    #: Declared options; a value enters the PNG metadata when the option's name is in :attr:`recorded`.
    options: ClassVar[tuple[Param, ...]] = ()
    #: Options that change the output (precision, provider): recorded with each image.
    recorded: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`make_controlnet` runs ControlNets and :meth:`make_denoiser` honours
    #: :attr:`DenoiserSpec.residuals` (ControlNet residual inputs).
    runs_controlnets: ClassVar[bool] = False

    def unavailable_reason(self, device: str = "cpu") -> str | None:
        """``None`` if this backend can run on ``device`` here, else a one-line reason and fix."""
        return None

    @abstractmethod
    def make_denoiser(self, module: Any, spec: DenoiserSpec) -> Denoiser:
        """A denoiser computing what ``module`` (a torch ``nn.Module``) computes, on this backend, as ``spec`` says."""

    def make_controlnet(self, module: Any, spec: DenoiserSpec) -> ControlNetRunner:
        """A runner for ``module`` (a diffusers ``ControlNetModel``): its raw residuals on this backend."""
        raise controlnet_refused(self.name)

    def validate_options(self, values: Mapping[str, Any] | None) -> dict[str, Any]:
        """Every declared option's value: ``values`` converted and checked, else its (environment) default."""
        return validate_options(f"backend {self.name!r}", self.options, values, "--backend-opt")

    def resolve(self, device: str, dtype: str = "fp32", options: Mapping[str, Any] | None = None) -> ResolvedBackend:
        """This backend checked for ``device`` with validated ``options``, or a one-line error."""
        reason = self.unavailable_reason(device)
        if reason:
            raise BackendUnavailableError(f"backend {self.name!r} cannot run on {device}: {reason}")
        return ResolvedBackend(self, device, dtype, self.validate_options(options))


def controlnet_refused(name: str) -> ParameterError:
    """The one-line error for ``--control`` on backend ``name``, which runs no ControlNets."""
    return ParameterError(f"ControlNet does not run on --backend {name}", "use --backend torch, onnx or tensorrt")


@dataclass(frozen=True)
class DenoiserSpec:
    """What a backend is asked for: the module's output kind, where and how to run it, and for what shapes."""

    prediction_type: str
    device: str = "cpu"
    #: A ``torch.dtype`` (``None``: float32).
    dtype: Any = None
    #: A hash of the weights: exporting backends key their artifacts by it.
    model_id: str = ""
    #: This backend's validated options.
    options: Mapping[str, Any] = field(default_factory=dict)
    #: What the task will ask of the denoiser (backends that build shape-specific engines use it).
    shapes: ExportShapes | None = None
    #: A U-Net that takes ControlNet residuals from the conditioning (``down_block_additional_residuals``,
    #: ``mid_block_additional_residual``); only backends with :attr:`Backend.runs_controlnets` honour it.
    residuals: bool = False


class ControlNetRunner(Protocol):
    """``runner(sample, timestep, encoder_hidden_states, controlnet_cond, added_cond_kwargs) -> (down, mid)``:
    a ControlNet's raw residuals (conditioning scale 1, no guess mode); the caller scales them."""

    def __call__(self, sample: Any, timestep: Any, text: Any, image: Any, added: Any) -> tuple[list[Any], Any]: ...


@dataclass(frozen=True)
class ResolvedBackend:
    """A backend checked once for a device, with its dtype and options: what a run carries down."""

    backend: Backend
    device: str
    dtype: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype]

    def record(self) -> dict[str, Any]:
        """The options that change the output, for the image's metadata."""
        return {k: self.options[k] for k in self.backend.recorded if k in self.options}

    def make_denoiser(
        self,
        module: Any,
        *,
        prediction_type: str,
        model_id: str = "",
        shapes: ExportShapes | None = None,
        residuals: bool = False,
    ) -> Denoiser:
        if residuals and not self.backend.runs_controlnets:
            raise controlnet_refused(self.name)
        spec = DenoiserSpec(prediction_type, self.device, self.torch_dtype, model_id, self.options, shapes, residuals)
        return self.backend.make_denoiser(module, spec)

    def make_controlnet(
        self, module: Any, *, model_id: str = "", shapes: ExportShapes | None = None
    ) -> ControlNetRunner:
        """A ControlNet runner on this backend (``model_id``: its weights' hash, keying exports)."""
        spec = DenoiserSpec("epsilon", self.device, self.torch_dtype, model_id, self.options, shapes)
        return self.backend.make_controlnet(module, spec)


def validate_options(
    owner: str, declared: tuple[Param, ...], values: Mapping[str, Any] | None, flag: str
) -> dict[str, Any]:
    """``values`` checked against ``declared`` options, defaults (or their environment variables) filled in.

    ``owner`` names whose options they are in errors (``backend 'onnx'``); ``flag`` is how users pass one.
    """
    values = dict(values or {})
    params = {p.name: p for p in declared}
    unknown = sorted(set(values) - set(params))
    if unknown:
        names = ", ".join(params) or "none"
        raise ParameterError(f"{owner} has no option {unknown[0]!r}", f"its options are: {names}")
    resolved = {}
    for name, param in params.items():
        raw = values[name] if name in values else param.effective_default()
        try:
            resolved[name] = param.validate(raw)
        except ParameterError as error:
            source = f" (from {param.env})" if name not in values and param.env else ""
            detail = error.problem.removeprefix(f"{param.flag}: ").replace(f"{param.flag} ", f"{name}=", 1)
            raise ParameterError(
                f"{owner} option {name}{source}: {detail}",
                f"pass {flag} {name}=VALUE {param.range_text() or (f'({error.fix})' if error.fix else '')}".rstrip(),
            ) from None
    return resolved
