"""``difftool export triton``: a Triton Inference Server model repository (ONNX; the TensorRT plan if built)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from difftool.core.errors import ParameterError
from difftool.core.exporter import Exporter, ExportResult, ExportTarget
from difftool.core.params import Param
from difftool.exporters.formats import export_name as _name


def _model_name(name: str) -> str:
    """A Triton model name: one folder inside the repository (``../x``, ``.`` or ``a/b`` would write elsewhere)."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", name):
        raise ParameterError(
            f"--name {name!r} is not a model name (one folder in the repository)",
            "use letters, digits, _ . - (not starting with . or -), such as difftool_superres",
        )
    return name


class TritonExporter(Exporter):
    name = "triton"
    summary = "a Triton Inference Server model repository (ONNX; the TensorRT plan if built)"
    options = (
        Param("output", "path", required=True, help="model repository folder"),
        Param("name", "string", default=None, help="model name in the repository (default: difftool_TASK)"),
        Param("max_batch", "int", default=8, min=1, max=1024, help="Triton batch limit"),
        Param("instances", "int", default=1, min=1, max=64, help="model instances"),
        Param("gpu", "bool", default=False, help="instances on GPUs (KIND_GPU) instead of CPUs"),
    )

    def export(self, target: ExportTarget, task: str, options: Mapping[str, Any]) -> ExportResult:
        from difftool.exporters.onnx import UNetSignature, cached_export
        from difftool.runtimes.triton.export import TritonOptions, write_repository

        name = _model_name(options["name"] or f"difftool_{task}")  # before any export
        entry = cached_export(target.module, name=_name(target), model_id=target.model_id)
        settings = TritonOptions(
            options["max_batch"], options["instances"], "KIND_GPU" if options["gpu"] else "KIND_CPU"
        )
        folder = write_repository(
            options["output"],
            name,
            entry.file("model.onnx"),
            UNetSignature.of(target.module),
            settings,
            weights_id=target.model_id,
        )
        repo = Path(options["output"]).resolve()
        return ExportResult(folder, [f"serve with: tritonserver --model-repository {repo}"])
