"""TensorRT engines from the ONNX exports, and a Denoiser that runs them on CUDA tensors.

Written against TensorRT 10's Python API (name-based I/O, ``execute_async_v3``). The profile logic
is plain Python and tested everywhere; building and running engines needs an NVIDIA GPU, CUDA and
the ``tensorrt`` package (``pip install "difftool[gpu]"``), and its tests are marked ``gpu``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftool.core.denoiser import Denoiser
from difftool.core.errors import BackendUnavailableError, ParameterError
from difftool.exporters.cache import ArtifactCache, Entry
from difftool.exporters.onnx import graph_inputs

ENGINE_FILE = "model.engine"
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """An optimization profile: per input name, the (min, opt, max) shapes the engine accepts."""

    shapes: Mapping[str, tuple[Shape, Shape, Shape]]

    def covers(self, request: Mapping[str, Shape]) -> bool:
        for name, shape in request.items():
            if name not in self.shapes:
                return False
            low, _, high = self.shapes[name]
            if len(shape) != len(low) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high, strict=True)):
                return False
        return True

    def as_json(self) -> dict[str, list[list[int]]]:
        return {name: [list(s) for s in triple] for name, triple in sorted(self.shapes.items())}


def unet_profile(
    in_channels: int, multiple: int, batch: tuple[int, int, int], size: tuple[int, int, int], class_labels: bool
) -> Profile:
    """A profile for a pixel U-Net: ``batch`` and square ``size`` as (min, opt, max), sizes in pixels."""

    def sample(b: int, s: int) -> Shape:
        s = max(multiple, s // multiple * multiple)
        return (b, in_channels, s, s)

    shapes: dict[str, tuple[Shape, Shape, Shape]] = {
        "sample": (sample(batch[0], size[0]), sample(batch[1], size[1]), sample(batch[2], size[2])),
        "timestep": ((batch[0],), (batch[1],), (batch[2],)),
    }
    if class_labels:
        shapes["class_labels"] = ((batch[0],), (batch[1],), (batch[2],))
    return Profile(shapes)


def signature_profile(
    signature: Any,
    batch: tuple[int, int, int],
    size: tuple[int, int, int],
    tokens: tuple[int, int, int] = (77, 77, 77),
) -> Profile:
    """A profile for every input of an exported U-Net (:class:`~difftool.exporters.onnx.UNetSignature`).

    ``size`` is the square sample size in the U-Net's own units (pixels for pixel models, latent
    cells for Stable Diffusion: 512 px is 64), as (min, opt, max); ``tokens`` the text length.
    """
    profile = unet_profile(signature.in_channels, signature.multiple, batch, size, signature.class_labels)
    shapes = dict(profile.shapes)
    if signature.context_dim:
        shapes["encoder_hidden_states"] = tuple(
            (b, t, signature.context_dim) for b, t in zip(batch, tokens, strict=True)
        )  # type: ignore[assignment]
    if signature.text_embeds_dim:
        shapes["text_embeds"] = tuple((b, signature.text_embeds_dim) for b in batch)  # type: ignore[assignment]
        shapes["time_ids"] = tuple((b, signature.time_ids) for b in batch)  # type: ignore[assignment]
    return Profile(shapes)


def select_profile(profiles: Sequence[Profile], request: Mapping[str, Shape]) -> int:
    """Index of the first profile covering every requested input shape, or a clear error."""
    for index, profile in enumerate(profiles):
        if profile.covers(request):
            return index
    wanted = ", ".join(f"{name} {list(shape)}" for name, shape in request.items())
    built = "; ".join(
        f"#{i}: " + ", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, _, hi) in p.shapes.items())
        for i, p in enumerate(profiles)
    )
    raise ParameterError(
        f"no TensorRT profile covers {wanted} (engine built for {built})",
        "use a smaller --tile, or rebuild the engine with a larger profile (DIFFTOOL_TRT_MAX_SIZE)",
    )


def unavailable_reason(device: str) -> str | None:
    """Why TensorRT cannot run here, or ``None``."""
    import importlib.util

    if not device.startswith("cuda"):
        return "TensorRT needs an NVIDIA GPU; pass --device cuda"
    import torch

    if not torch.cuda.is_available():
        return "TensorRT requires an NVIDIA GPU with CUDA support, and this PyTorch sees none"
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed; pip install 'difftool[gpu]'"
    return None


def build_engine(onnx_path: Path, engine_path: Path, profiles: Sequence[Profile], fp16: bool = True) -> None:
    """Parse ``onnx_path`` and build a serialized engine with ``profiles`` into ``engine_path``."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailableError(f"TensorRT cannot parse the ONNX export: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            optimization.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendUnavailableError("TensorRT failed to build the engine (see its log above)")
    engine_path.write_bytes(bytes(serialized))


def cached_engine(onnx: Entry, profiles: Sequence[Profile], fp16: bool, cache: ArtifactCache | None = None) -> Entry:
    """The engine for an ONNX cache entry: keyed by the export, profiles, precision, TensorRT and the GPU."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    components = {
        "onnx": onnx.manifest["key"],
        "profiles": [p.as_json() for p in profiles],
        "precision": "fp16" if fp16 else "fp32",
        "tensorrt": trt.__version__,
        "compute_capability": f"{major}.{minor}",
        "format": 1,
    }

    def build(folder: Path) -> dict[str, Any]:
        started = time.perf_counter()
        build_engine(onnx.file("model.onnx"), folder / ENGINE_FILE, profiles, fp16)
        return {"seconds": round(time.perf_counter() - started, 2)}

    return (cache or ArtifactCache()).get_or_build("tensorrt", onnx.manifest["name"], components, build)


class TensorRTDenoiser(Denoiser):
    """Runs an engine on CUDA tensors in place: inputs and output stay on the GPU, no host copies."""

    backend = "tensorrt"

    def __init__(
        self,
        entry: Entry,
        profiles: Sequence[Profile],
        *,
        signature: Any,
        sample_channels: int,
        prediction_type: str,
        device: str,
    ) -> None:
        import tensorrt as trt
        import torch

        self.device = torch.device(device)
        self.dtype = torch.float32
        self.signature = signature
        self.in_channels, self.sample_channels = signature.in_channels, sample_channels
        self.prediction_type = prediction_type
        self.profiles = list(profiles)
        self.fingerprint = entry.manifest["key"]
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(entry.file(ENGINE_FILE).read_bytes())
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)
        self._profile: int | None = None

    def __call__(self, sample: Any, timestep: Any, cond: Mapping[str, Any]) -> Any:
        import torch

        inputs = graph_inputs(self.signature, sample, timestep, cond, self.device)
        x = inputs["sample"]
        index = select_profile(self.profiles, {k: tuple(v.shape) for k, v in inputs.items()})
        if index != self._profile:
            self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self._profile = index
        out = torch.empty((x.shape[0], self.sample_channels, *x.shape[2:]), device=self.device)
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.context.set_tensor_address("out", out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BackendUnavailableError("TensorRT failed to run the engine")
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out.to(sample.dtype)
