"""The built-in PyTorch backend (ONNX Runtime and TensorRT come from the exporters)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from difftool.core.backend import Backend
from difftool.plugins.hookspecs import hookimpl

if TYPE_CHECKING:
    from difftool.core.denoiser import Denoiser


class TorchBackend(Backend):
    name = "torch"
    summary = "PyTorch eager, on the CPU or a CUDA GPU"

    def unavailable_reason(self, device: str = "cpu") -> str | None:
        if device == "cpu":
            return None
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                return "this PyTorch build sees no CUDA GPU; use --device cpu"
            index = int(device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                return f"there is no GPU {index} (found {torch.cuda.device_count()}); use --device cuda:0"
            return None
        return f"unknown device {device!r}; use cpu or cuda[:N]"

    def make_denoiser(
        self, module: Any, *, prediction_type: str, device: str, dtype: Any, model_id: str = ""
    ) -> Denoiser:
        from difftool.core.denoiser import TorchDenoiser

        return TorchDenoiser(module, prediction_type=prediction_type, device=device, dtype=dtype)


class OnnxBackend(Backend):
    name = "onnx"
    summary = "ONNX Runtime; the model is exported, validated and cached on first use"

    def unavailable_reason(self, device: str = "cpu") -> str | None:
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} not installed; pip install 'difftool[onnx]'"
        return None

    def make_denoiser(
        self, module: Any, *, prediction_type: str, device: str, dtype: Any, model_id: str = ""
    ) -> Denoiser:
        import torch

        from difftool.exporters.onnx import UNetSignature, cached_export
        from difftool.exporters.onnxruntime_denoiser import OnnxRuntimeDenoiser

        # fp16 runs get an fp16 graph (fp32 I/O); bf16 has no ONNX Runtime kernels to speak of: fp32.
        precision = "fp16" if dtype == torch.float16 else "fp32"
        entry = cached_export(module, name=f"unet-{model_id[:12] or 'model'}", precision=precision, model_id=model_id)
        optimized = entry.file("model.opt.onnx")
        denoiser = OnnxRuntimeDenoiser(
            optimized if optimized.is_file() and not device.startswith("cuda") else entry.file("model.onnx"),
            UNetSignature.of(module),
            prediction_type=prediction_type,
            sample_channels=int(module.config.out_channels),
            device=device,
            fp16=precision == "fp16",
        )
        denoiser.fingerprint = entry.manifest["key"]
        return denoiser


class TensorRTBackend(Backend):
    name = "tensorrt"
    accepts_shapes = True
    summary = "TensorRT engines (NVIDIA GPUs); built from the ONNX export on first use, cached per GPU"
    #: Recent runners: deserialising (and refitting) an engine costs seconds, so a folder job does it once.
    _engines: Any = None

    def unavailable_reason(self, device: str = "cpu") -> str | None:
        from difftool.exporters.tensorrt import unavailable_reason

        return OnnxBackend().unavailable_reason(device) or unavailable_reason(device)

    def make_denoiser(
        self, module: Any, *, prediction_type: str, device: str, dtype: Any, model_id: str = "", shapes: Any = None
    ) -> Denoiser:
        import os

        import torch

        from difftool.exporters.cache import Recent
        from difftool.exporters.onnx import UNetSignature, cached_export
        from difftool.exporters.tensorrt import (
            GRAPH_VARIABLE,
            BuildOptions,
            TensorRTDenoiser,
            cached_engine,
            engine_profile,
        )

        signature = UNetSignature.of(module)
        profile = engine_profile(signature, shapes, int(os.environ.get("DIFFTOOL_TRT_MAX_SIZE", "1024")))
        precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, "fp16")
        # Stable Diffusion U-Nets meet LoRAs and fine-tunes of one architecture: refit, don't rebuild.
        refit = os.environ.get("DIFFTOOL_TRT_REFIT", "1" if signature.context_dim else "0") == "1"
        onnx = cached_export(module, name=f"unet-{model_id[:12] or 'model'}", model_id=model_id)
        engine = cached_engine(onnx, [profile], BuildOptions(precision, refittable=refit))
        if TensorRTBackend._engines is None:
            TensorRTBackend._engines = Recent(2)
        key = (engine.manifest["key"], onnx.manifest["key"], device, prediction_type, os.environ.get(GRAPH_VARIABLE))
        return TensorRTBackend._engines.get(
            key,
            lambda: TensorRTDenoiser(
                engine,
                [profile],
                signature=signature,
                sample_channels=int(module.config.out_channels),
                prediction_type=prediction_type,
                device=device,
                onnx=onnx,
                dtype=dtype,
            ),
        )


class TritonBackend(Backend):
    name = "triton"
    summary = "a Triton Inference Server (gRPC, DIFFTOOL_TRITON_URL) serving `difftool export triton` models"

    def unavailable_reason(self, device: str = "cpu") -> str | None:
        from difftool.exporters.triton_denoiser import unavailable_reason

        return unavailable_reason()

    def make_denoiser(
        self, module: Any, *, prediction_type: str, device: str, dtype: Any, model_id: str = ""
    ) -> Denoiser:
        import os

        from difftool.exporters.onnx import UNetSignature, weights_hash
        from difftool.exporters.triton_denoiser import URL_VARIABLE, TritonDenoiser

        signature = UNetSignature.of(module)
        return TritonDenoiser(
            os.environ[URL_VARIABLE], model_id or weights_hash(module), signature, prediction_type=prediction_type
        )


@hookimpl
def register_backends(register: Callable[[Backend], None]) -> None:
    register(TorchBackend())
    register(OnnxBackend())
    register(TensorRTBackend())
    register(TritonBackend())
