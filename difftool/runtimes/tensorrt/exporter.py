"""``difftool export tensorrt``: a TensorRT engine built from the validated ONNX export, cached per GPU."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from difftool.core.exporter import Exporter, ExportResult, ExportTarget
from difftool.core.params import Param
from difftool.exporters.formats import PRECISION_HELP
from difftool.exporters.options import TENSORRT_OPTIONS


class TensorRTExporter(Exporter):
    name = "tensorrt"
    summary = "a TensorRT engine built from the validated ONNX export, cached per GPU"
    options = (
        Param("device", "string", default="cuda", help="the GPU the engine is for"),
        Param("precision", "choice", default="fp16", choices=("fp16", "bf16", "fp32", "fp8"), help=PRECISION_HELP),
        *TENSORRT_OPTIONS,
    )

    def unavailable_reason(self, options: Mapping[str, Any]) -> str | None:
        from difftool.core.errors import ParameterError
        from difftool.runtimes.tensorrt.engine import precision_flags, unavailable_reason

        if options["precision"] == "fp8":
            try:
                precision_flags("fp8", (9, 0))
            except ParameterError as error:
                return str(error)
        return unavailable_reason(options["device"])

    def export(self, target: ExportTarget, task: str, options: Mapping[str, Any]) -> ExportResult:
        import torch

        from difftool.runtimes.tensorrt.denoiser import engine_denoiser

        engine_options = {p.name: options[p.name] for p in TENSORRT_OPTIONS}
        denoiser = engine_denoiser(
            target.module,
            prediction_type=target.prediction_type,
            device=options["device"],
            dtype={"fp32": torch.float32, "bf16": torch.bfloat16}.get(options["precision"], torch.float16),
            model_id=target.model_id,
            options=engine_options,
            shapes=target.shapes,
        )
        profiles = [p.as_json() for p in denoiser.profiles]
        return ExportResult(denoiser.engine_path, [f"engine {denoiser.fingerprint}", f"profiles: {profiles}"])
