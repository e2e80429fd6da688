"""The Exporter interface: a task's network -> an artifact for another runtime (``difftool export NAME``).

Exporters come from plugins (``register_exporters``), like tasks and backends; the built-in ONNX,
TensorRT and Triton exporters register through the same hook. A task offers its network for export
through :meth:`difftool.core.task.Task.export_target`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from difftool.core.params import ExportShapes, Param, validate_options


@dataclass(frozen=True)
class ExportTarget:
    """What a task offers for export: its denoiser network (diffusers U-Net call convention) and identity."""

    module: Any
    #: A hash of the weights (the artifact cache keys exports by it).
    model_id: str
    prediction_type: str = "epsilon"
    #: What runs will ask of the network (an ``ExportShapes``): engines built ahead of time match them.
    shapes: ExportShapes | None = None


@dataclass
class ExportResult:
    """Where the artifact is, and what to tell the user about it (one line each)."""

    path: Path
    details: list[str] = field(default_factory=list)


class Exporter(ABC):
    """A named artifact format (``onnx``, ``tensorrt``, ``triton``, ...)."""

    name: str
    summary: str = ""
    #: Declared options: the command's flags (``--precision``), checked like task parameters.
    options: ClassVar[tuple[Param, ...]] = ()

    def validate_options(self, values: Mapping[str, Any] | None) -> dict[str, Any]:
        return validate_options(f"exporter {self.name!r}", self.options, values, f"difftool export {self.name} --")

    def unavailable_reason(self, options: Mapping[str, Any]) -> str | None:
        """``None`` if this exporter can run here with ``options``, else a one-line reason and fix."""
        return None

    @abstractmethod
    def export(self, target: ExportTarget, task: str, options: Mapping[str, Any]) -> ExportResult:
        """Export ``target`` (task ``task``'s network) with validated ``options``; return where it went."""
