"""The built-in exporters (``difftool export onnx|tensorrt|triton``), registered by a plugin like any other."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from difftool.core.errors import ParameterError
from difftool.core.exporter import Exporter, ExportResult, ExportTarget
from difftool.core.task import Param
from difftool.exporters.options import TENSORRT_OPTIONS

PRECISION_HELP = "engine precision (bf16 needs compute capability 8.0+; fp8 is refused: it needs a quantized export)"


def _name(target: ExportTarget) -> str:
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
            target.module, name=_name(target), precision=options["precision"], model_id=target.model_id
        )
        report = entry.manifest["validation"]
        details = [f"shape {s['shape']}: max relative error {s['relative_error']:.2e}" for s in report["shapes"]]
        details.append(f"tolerance {report['tolerance']:.0e}; manifest {entry.file('manifest.json')}")
        return ExportResult(entry.file("model.onnx"), details)


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
        from difftool.exporters.tensorrt_engine import precision_flags, unavailable_reason

        if options["precision"] == "fp8":
            try:
                precision_flags("fp8", (9, 0))
            except ParameterError as error:
                return str(error)
        return unavailable_reason(options["device"])

    def export(self, target: ExportTarget, task: str, options: Mapping[str, Any]) -> ExportResult:
        import torch

        from difftool.exporters.tensorrt_denoiser import engine_denoiser

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
        from difftool.exporters.triton import TritonOptions, write_repository

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
