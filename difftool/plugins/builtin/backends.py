"""The built-in backends: PyTorch, and ONNX Runtime, TensorRT and Triton over the exporters' engines.

``torch``, ``onnx`` and ``tensorrt`` also run ControlNets: they implement the Stable Diffusion plugin's
:class:`~difftool.plugins.builtin.sd.control_backend.ControlNetCapable`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from difftool.core.backend import Backend, DenoiserSpec
from difftool.core.params import Param
from difftool.exporters.options import ORT_OPTIONS, TENSORRT_OPTIONS
from difftool.plugins.builtin.sd.control_backend import ControlNetCapable, ControlNetRunner
from difftool.plugins.hookspecs import hookimpl

if TYPE_CHECKING:
    from difftool.core.denoiser import Denoiser


def onnx_packages_missing() -> str | None:
    """Why the ONNX export cannot run here (a missing package), or ``None``."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed; pip install 'difftool[onnx]'" if missing else None


class TorchBackend(Backend, ControlNetCapable):
    name = "torch"
    summary = "PyTorch eager, on the CPU or a CUDA GPU"
    options = (
        Param(
            "offload",
            "choice",
            default="none",
            choices=("none", "model"),
            env="DIFFTOOL_OFFLOAD",
            help="SD 3.5 / Flux: model frees the text encoders after encoding and keeps each other part on the GPU "
            "only while it runs (a Flux-size model on a 24 GB machine; slower)",
        ),
    )

    def unavailable_reason(self, device: str = "cpu") -> str | None:
        if device == "cpu":
            return None
        if device.startswith("cuda"):
            from difftool.core.cuda import device_index, runtime

            cuda = runtime()
            if not cuda.is_available():
                return "this PyTorch build sees no CUDA GPU; use --device cpu"
            if device_index(device) >= cuda.device_count():
                return f"there is no GPU {device_index(device)} (found {cuda.device_count()}); use --device cuda:0"
            return None
        return f"unknown device {device!r}; use cpu or cuda[:N]"

    def make_denoiser(self, module: Any, spec: DenoiserSpec) -> Denoiser:
        from difftool.core.denoiser import TorchDenoiser

        return TorchDenoiser(module, prediction_type=spec.prediction_type, device=spec.device, dtype=spec.dtype)

    def make_residual_denoiser(self, module: Any, spec: DenoiserSpec) -> Denoiser:
        return self.make_denoiser(module, spec)  # it passes the residuals to the U-Net as keywords

    def make_controlnet(self, module: Any, spec: DenoiserSpec) -> ControlNetRunner:
        from difftool.plugins.builtin.sd.control_backend import TorchControlNet

        return TorchControlNet(module)  # loaded on the run's device in its dtype (sd.controlnet.loaded)


class OnnxBackend(Backend, ControlNetCapable):
    name = "onnx"
    summary = "ONNX Runtime; the model is exported, validated and cached on first use"
    options = (
        *ORT_OPTIONS,
        Param(
            "export",
            "choice",
            default="unet",
            choices=("unet", "all"),
            env="DIFFTOOL_ONNX_EXPORT",
            help="Stable Diffusion: all also runs the text encoders and VAE in ONNX Runtime",
        ),
    )
    recorded = ("provider", "export")

    def unavailable_reason(self, device: str = "cpu") -> str | None:
        reason = onnx_packages_missing()
        if reason or not device.startswith("cuda"):
            return reason
        from difftool.core.cuda import runtime

        if not runtime().is_available():
            return "this PyTorch sees no CUDA GPU; use --device cpu"
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "this onnxruntime has no CUDA provider; pip install 'difftool[onnx-gpu]' (onnxruntime-gpu)"
        return None

    def make_denoiser(self, module: Any, spec: DenoiserSpec) -> Denoiser:
        import torch

        from difftool.exporters.onnx import UNetSignature, cached_export
        from difftool.runtimes.onnxruntime.denoiser import OnnxRuntimeDenoiser

        # fp16 runs get an fp16 graph (fp32 I/O); bf16 has no ONNX Runtime kernels to speak of: fp32.
        options = self.validate_options(spec.options)
        precision = "fp16" if spec.dtype == torch.float16 else "fp32"
        name = f"unet-{spec.model_id[:12] or 'model'}"
        entry = cached_export(module, name=name, precision=precision, model_id=spec.model_id)
        optimized = entry.file("model.opt.onnx")
        denoiser = OnnxRuntimeDenoiser(
            optimized if optimized.is_file() and not spec.device.startswith("cuda") else entry.file("model.onnx"),
            UNetSignature.of(module),
            prediction_type=spec.prediction_type,
            sample_channels=int(module.config.out_channels),
            device=spec.device,
            fp16=precision == "fp16",
            provider=options["provider"],
            threads=int(options["threads"]),
            shapes=spec.shapes,
        )
        denoiser.fingerprint = entry.manifest["key"]
        return denoiser

    def make_residual_denoiser(self, module: Any, spec: DenoiserSpec) -> Denoiser:
        """The U-Net taking ControlNet residuals: an fp32 graph (whatever the run's dtype)."""
        from difftool.exporters.onnx_controlnet import cached_residual_unet
        from difftool.runtimes.onnxruntime.denoiser import OnnxRuntimeDenoiser

        options = self.validate_options(spec.options)
        entry, signature, residuals = cached_residual_unet(module, spec.model_id)
        denoiser = OnnxRuntimeDenoiser(
            entry.file("model.onnx"), signature, prediction_type=spec.prediction_type,
            sample_channels=int(module.config.out_channels), device=spec.device, provider=options["provider"],
            threads=int(options["threads"]), residuals=residuals,
        )  # fmt: skip
        denoiser.fingerprint = entry.manifest["key"]
        return denoiser

    def make_controlnet(self, module: Any, spec: DenoiserSpec) -> ControlNetRunner:
        from difftool.runtimes.onnxruntime.controlnet import onnx_controlnet

        return onnx_controlnet(
            module, model_id=spec.model_id, device=spec.device, options=self.validate_options(spec.options)
        )


class TensorRTBackend(Backend, ControlNetCapable):
    name = "tensorrt"
    summary = "TensorRT engines (NVIDIA GPUs); built from the ONNX export on first use, cached per GPU"
    options = TENSORRT_OPTIONS

    def unavailable_reason(self, device: str = "cpu") -> str | None:
        from difftool.runtimes.tensorrt.engine import unavailable_reason

        return onnx_packages_missing() or unavailable_reason(device)  # TensorRT parses the ONNX itself

    def make_denoiser(self, module: Any, spec: DenoiserSpec, residuals: bool = False) -> Denoiser:
        from difftool.runtimes.tensorrt.denoiser import engine_denoiser

        return engine_denoiser(
            module,
            prediction_type=spec.prediction_type,
            device=spec.device,
            dtype=spec.dtype,
            model_id=spec.model_id,
            options=self.validate_options(spec.options),
            shapes=spec.shapes,
            residuals=residuals,
        )

    def make_residual_denoiser(self, module: Any, spec: DenoiserSpec) -> Denoiser:
        return self.make_denoiser(module, spec, residuals=True)

    def make_controlnet(self, module: Any, spec: DenoiserSpec) -> ControlNetRunner:
        from difftool.runtimes.tensorrt.controlnet import tensorrt_controlnet

        return tensorrt_controlnet(
            module, model_id=spec.model_id, device=spec.device, dtype=spec.dtype,
            options=self.validate_options(spec.options), shapes=spec.shapes,
        )  # fmt: skip


class TritonBackend(Backend):
    name = "triton"
    summary = "a Triton Inference Server (gRPC) serving `difftool export triton` models"
    options = (
        Param(
            "url",
            "string",
            default="localhost:8001",
            env="DIFFTOOL_TRITON_URL",
            help="the server's gRPC address (host:port or unix:/path)",
        ),
    )

    def unavailable_reason(self, device: str = "cpu") -> str | None:
        from difftool.runtimes.triton.denoiser import unavailable_reason

        return unavailable_reason()

    def make_denoiser(self, module: Any, spec: DenoiserSpec) -> Denoiser:
        from difftool.exporters.onnx import UNetSignature, weights_hash
        from difftool.runtimes.triton.denoiser import TritonDenoiser

        url = str(self.validate_options(spec.options)["url"])
        weights = spec.model_id or weights_hash(module)
        return TritonDenoiser(url, weights, UNetSignature.of(module), prediction_type=spec.prediction_type)


@hookimpl
def register_backends(register: Callable[[Backend], None]) -> None:
    register(TorchBackend())
    register(OnnxBackend())
    register(TensorRTBackend())
    register(TritonBackend())
