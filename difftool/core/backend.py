"""Backends turn a model into a :class:`~difftool.core.denoiser.Denoiser` that runs on some engine.

A backend that cannot run here says why through :meth:`Backend.unavailable_reason` (like a driver
check) instead of failing half-way through a job. Backends load their engines lazily.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from difftool.core.denoiser import Denoiser


class Backend(ABC):
    """A named way to run denoisers (``torch``, ``onnxruntime``, ``tensorrt``, ...)."""

    name: str
    summary: str = ""
    #: Set by backends that build shape-specific engines: ``make_denoiser`` then also receives
    #: ``shapes``, the task's :class:`~difftool.core.task.ExportShapes` (or ``None``).
    accepts_shapes: bool = False

    def unavailable_reason(self, device: str = "cpu") -> str | None:
        """``None`` if this backend can run on ``device`` here, else a one-line reason and fix."""
        return None

    @abstractmethod
    def make_denoiser(
        self,
        module: Any,
        *,
        prediction_type: str,
        device: str,
        dtype: torch.dtype,
        model_id: str = "",
    ) -> Denoiser:
        """A denoiser computing what ``module`` (a torch ``nn.Module``) computes, on this backend."""
