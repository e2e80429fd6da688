"""ControlNet on TensorRT: engines for a ControlNet and for the U-Net taking its residuals.

Both are built from the fp32 ONNX exports of :mod:`difftool.exporters.onnx_controlnet` (cached and
validated like the U-Net's) with the profiles of
:func:`~difftool.runtimes.tensorrt.profiles.controlnet_profiles`, and cached per GPU like every
engine. TensorRT 10 lowers them to the run's precision with builder flags; TensorRT 11 builds the
graph's own (fp32) precision only, so it needs ``--dtype fp32`` with ``--control``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from difftool.core.cuda import runtime
from difftool.core.errors import BackendUnavailableError
from difftool.core.runtime import current
from difftool.exporters.cache import Entry, Recent
from difftool.exporters.onnx_controlnet import ControlNetSignature
from difftool.runtimes.tensorrt.denoiser import fp32_control_graph
from difftool.runtimes.tensorrt.engine import load_engine
from difftool.runtimes.tensorrt.io import EngineIO, _check, aligned_empty, bind_inputs, bind_outputs
from difftool.runtimes.tensorrt.profiles import Profile, control_ranges, select_profile


def recent_controlnets() -> Recent:
    """Loaded ControlNet engines, reused by the next run (a folder job deserialises each once)."""
    return current().cache("tensorrt-controlnets", lambda: Recent(2))


def tensorrt_controlnet(
    module: Any, *, model_id: str, device: str, dtype: Any, options: Mapping[str, Any], shapes: Any
) -> TensorRTControlNet:
    """The ``tensorrt`` backend's ControlNet runner: export, build (or reuse) and load its engine."""
    import tensorrt as trt
    import torch

    from difftool.exporters.onnx_controlnet import cached_controlnet
    from difftool.runtimes.tensorrt.engine import BuildOptions, cached_engine, major_version
    from difftool.runtimes.tensorrt.profiles import controlnet_profiles

    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, "fp16")
    fp32_control_graph(precision, major_version(trt))
    onnx, signature = cached_controlnet(module, model_id)
    profile, _ = controlnet_profiles(signature, *control_ranges(shapes, int(options["max_size"])))
    build = BuildOptions(precision, workspace_gb=float(options["workspace_gb"]) or None)
    engine = cached_engine(onnx, [profile], build, device)
    key = (engine.manifest["key"], device)
    return recent_controlnets().get(
        key, lambda: TensorRTControlNet(engine, profile, signature, device=device, onnx=onnx)
    )


class TensorRTControlNet:
    """``runner(sample, timestep, text, image, added) -> (down, mid)`` on an engine, every tensor on the GPU."""

    backend = "tensorrt"

    def __init__(
        self, entry: Entry, profile: Profile, signature: ControlNetSignature, *, device: str, onnx: Entry | None = None
    ) -> None:
        """``onnx``: the export the engine was built from (a stripped engine's weights)."""
        self.cuda_device, self.device = device, runtime().placement(device)
        self.profile, self.signature = profile, signature
        self.fingerprint = entry.manifest["key"]
        self.runtime, self.engine, self.context, self.stream = load_engine(entry, device, onnx)
        self.io = EngineIO.of(self.engine, entry.path.name)
        self.io.expect(signature.input_names(), signature.residuals.names)
        self._profile_set = False

    def __call__(self, sample: Any, timestep: Any, text: Any, image: Any, added: Any) -> tuple[list[Any], Any]:
        from difftool.runtimes.onnxruntime.controlnet import controlnet_inputs_for

        cuda = runtime()
        inputs = controlnet_inputs_for(self.signature, sample, timestep, text, image, added, self.device)
        select_profile([self.profile], {k: tuple(v.shape) for k, v in inputs.items()})  # a clear error outside it
        current_stream = cuda.current_stream(self.cuda_device)
        self.stream.wait_stream(current_stream)
        with cuda.current(self.cuda_device), cuda.use_stream(self.stream):
            batch, _, height, width = inputs["sample"].shape
            shapes = self.signature.residuals.shapes(batch, height, width)
            outputs = {
                name: aligned_empty(tuple(shape), self.io.dtype(name), self.device)
                for name, shape in zip(self.signature.residuals.names, shapes, strict=True)
            }
            if not self._profile_set:
                _check(self.context.set_optimization_profile_async(0, self.stream.cuda_stream), "profile 0")
                self._profile_set = True
            bound = bind_inputs(self.context, self.io, inputs)  # noqa: F841 - referenced until it ran
            bind_outputs(self.context, self.io, outputs)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise BackendUnavailableError("TensorRT failed to run the ControlNet engine")
        current_stream.wait_stream(self.stream)
        *down, mid = (tensor.float() for tensor in outputs.values())
        return down, mid
