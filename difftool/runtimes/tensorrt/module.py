"""A one-image-in, one-image-out network (a community upscaler) as a TensorRT engine.

Built from the network's validated ONNX export (:mod:`difftool.exporters.onnx_modules`) with the same
engine cache, build options and device handling as the U-Net's; the profile covers the tiles the
tiler sends (one fixed size for window-attention exports).
"""

from __future__ import annotations

from typing import Any

from difftool.core.cuda import runtime
from difftool.core.errors import BackendUnavailableError
from difftool.exporters.cache import Entry
from difftool.runtimes.tensorrt.engine import load_engine
from difftool.runtimes.tensorrt.io import EngineIO, _check, aligned_empty, bind_inputs, bind_outputs
from difftool.runtimes.tensorrt.profiles import Profile, select_profile


def image_profile(low: int, high: int, channels: int = 3) -> Profile:
    """Square-or-not tiles of ``low``..``high`` pixels a side, batch 1, on the input named ``image``."""
    return Profile({"image": ((1, channels, low, low), (1, channels, high, high), (1, channels, high, high))})


class TensorRTModule:
    """``module(image) -> (out,)`` on an engine; ``out`` is ``scale`` times the input's height and width."""

    def __init__(
        self,
        entry: Entry,
        profile: Profile,
        *,
        device: str,
        scale: int,
        out_channels: int = 3,
        onnx: Entry | None = None,
    ) -> None:
        """``onnx``: the export the engine was built from (a stripped engine's weights)."""
        self.cuda_device, self.device = device, runtime().placement(device)
        self.profile, self.scale, self.out_channels = profile, scale, out_channels
        self.fingerprint = entry.manifest["key"]
        self.runtime, self.engine, self.context, self.stream = load_engine(entry, device, onnx)
        self.io = EngineIO.of(self.engine, entry.path.name)
        self.io.expect(["image"], ["out"])
        self._profile_set = False

    def __call__(self, image: Any) -> tuple[Any]:
        import torch

        cuda = runtime()
        x = image.to(self.device, torch.float32).contiguous()
        select_profile([self.profile], {"image": tuple(x.shape)})  # a clear error for a tile outside it
        shape = (x.shape[0], self.out_channels, x.shape[2] * self.scale, x.shape[3] * self.scale)
        current = cuda.current_stream(self.cuda_device)
        self.stream.wait_stream(current)
        with cuda.current(self.cuda_device), cuda.use_stream(self.stream):
            out = aligned_empty(shape, self.io.dtype("out"), self.device)
            if not self._profile_set:
                _check(self.context.set_optimization_profile_async(0, self.stream.cuda_stream), "profile 0")
                self._profile_set = True
            bound = bind_inputs(self.context, self.io, {"image": x})  # noqa: F841 - referenced until it ran
            bind_outputs(self.context, self.io, {"out": out})
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise BackendUnavailableError("TensorRT failed to run the engine")
        current.wait_stream(self.stream)
        return (out.float(),)


def module_engine(onnx: Entry, profile: Profile, *, device: str, precision: str, scale: int) -> TensorRTModule:
    """The engine for a module export on ``device`` (built on first use, cached like the U-Net's)."""
    import tensorrt as trt

    from difftool.runtimes.tensorrt.engine import BuildOptions, cached_engine, major_version

    if major_version(trt) >= 11:
        precision = "fp32"  # strongly typed: the precision of the (fp32) module export
    engine = cached_engine(onnx, [profile], BuildOptions(precision), device)
    return TensorRTModule(engine, profile, device=device, scale=scale, onnx=onnx)
