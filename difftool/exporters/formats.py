"""``difftool export onnx``, and what every format shares (the export's name, the precision help); the
TensorRT and Triton formats live with their runtimes (``difftool.runtimes``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from difftool.core.exporter import Exporter, ExportResult, ExportTarget
from difftool.core.task import Param

PRECISION_HELP = "engine precision (bf16 needs compute capability 8.0+; fp8 is refused: it needs a quantized export)"


def export_name(target: ExportTarget) -> str:
    return f"unet-{target.model_id[:12] or 'model'}"


class OnnxExporter(Exporter):
    name = "onnx"
    summary = "the U-Net as ONNX, validated against PyTorch and cached"
    options = (
        Param(
            "precision",
            "choice",
            default="fp32",
            choices=("fp32", "fp16"),
            help="fp16 keeps fp32 inputs/output, normalisations, softmax and the timestep embedding",
        ),
    )

    def unavailable_reason(self, options: Mapping[str, Any]) -> str | None:
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
        return f"{', '.join(missing)} not installed; pip install 'difftool[onnx]'" if missing else None

    def export(self, target: ExportTarget, task: str, options: Mapping[str, Any]) -> ExportResult:
        from difftool.exporters.onnx import cached_export

        entry = cached_export(
            target.module, name=export_name(target), precision=options["precision"], model_id=target.model_id
        )
        report = entry.manifest["validation"]
        details = [f"shape {s['shape']}: max relative error {s['relative_error']:.2e}" for s in report["shapes"]]
        details.append(f"tolerance {report['tolerance']:.0e}; manifest {entry.file('manifest.json')}")
        return ExportResult(entry.file("model.onnx"), details)
