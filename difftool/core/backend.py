"""Backends turn a model into a :class:`~difftool.core.denoiser.Denoiser` that runs on some engine.

A backend that cannot run here says why through :meth:`Backend.unavailable_reason` (like a driver
check) instead of failing half-way through a job. Backends load their engines lazily.

A backend declares its options as :class:`~difftool.core.params.Param` s, like a task's parameters:
the CLI offers them as ``--backend-opt NAME=VALUE``, ``difftool backends`` and the GUI list them.
:meth:`Backend.resolve` checks a backend once for a device, dtype and options and returns the
:class:`ResolvedBackend` that a run carries down to the task; nothing looks a backend up again.

This interface names no model family. What only some models need is a capability their plugin declares
as a protocol and a backend implements; the plugin asks ``isinstance(backend, TheProtocol)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from difftool.core.errors import BackendUnavailableError
from difftool.core.params import ExportShapes, Param, validate_options

if TYPE_CHECKING:
    import torch

    from difftool.core.denoiser import Denoiser


class Backend(ABC):
    """A named way to run denoisers (``torch``, ``onnx``, ``tensorrt``, ...)."""

    name: str
    summary: str = ""
    #: Declared options; a value enters the PNG metadata when the option's name is in :attr:`recorded`.
    options: ClassVar[tuple[Param, ...]] = ()
    #: Options that change the output (precision, provider): recorded with each image.
    recorded: ClassVar[tuple[str, ...]] = ()

    def unavailable_reason(self, device: str = "cpu") -> str | None:
        """``None`` if this backend can run on ``device`` here, else a one-line reason and fix."""
        return None

    @abstractmethod
    def make_denoiser(self, module: Any, spec: DenoiserSpec) -> Denoiser:
        """A denoiser computing what ``module`` (a torch ``nn.Module``) computes, on this backend, as ``spec`` says."""

    def validate_options(self, values: Mapping[str, Any] | None) -> dict[str, Any]:
        """Every declared option's value: ``values`` converted and checked, else its (environment) default."""
        return validate_options(f"backend {self.name!r}", self.options, values, "--backend-opt")

    def resolve(self, device: str, dtype: str = "fp32", options: Mapping[str, Any] | None = None) -> ResolvedBackend:
        """This backend checked for ``device`` with validated ``options``, or a one-line error."""
        reason = self.unavailable_reason(device)
        if reason:
            raise BackendUnavailableError(f"backend {self.name!r} cannot run on {device}: {reason}")
        return ResolvedBackend(self, device, dtype, self.validate_options(options))


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

    def spec(self, *, prediction_type: str, model_id: str = "", shapes: ExportShapes | None = None) -> DenoiserSpec:
        """What this backend is asked for a network: its output kind, this run's device, dtype and options."""
        return DenoiserSpec(prediction_type, self.device, self.torch_dtype, model_id, self.options, shapes)

    def make_denoiser(
        self, module: Any, *, prediction_type: str, model_id: str = "", shapes: ExportShapes | None = None
    ) -> Denoiser:
        spec = self.spec(prediction_type=prediction_type, model_id=model_id, shapes=shapes)
        return self.backend.make_denoiser(module, spec)
