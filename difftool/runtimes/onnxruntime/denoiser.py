"""A :class:`~difftool.core.denoiser.Denoiser` over an ONNX Runtime session.

Inputs and the output are bound to torch tensors by pointer (IO binding), so on a GPU no step copies
through host memory and on the CPU no step converts to numpy.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difftool.core.denoiser import Conditioning, Denoiser
from difftool.core.errors import BackendUnavailableError, ParameterError
from difftool.core.runtime import current
from difftool.exporters.cache import Recent
from difftool.exporters.onnx import UNetSignature, graph_inputs
from difftool.runtimes.tensorrt.profiles import Profile

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_NUMPY_TYPES = {torch.float32: np.float32, torch.int64: np.int64}


def provider_chain(
    device: str,
    choice: str,
    fp16: bool = False,
    cache_dir: Path | None = None,
    profile: Profile | None = None,
    stream: int = 0,
) -> list[Any]:
    """The provider list for an ``InferenceSession``: the chosen provider first, then its fallbacks.

    ``profile``: the shapes the task declared; the TensorRT provider builds its engine for exactly that
    range instead of the first shape it sees (and rebuilding mid-run when a later shape leaves it).
    ``stream``: the CUDA stream (handle) the CUDA provider computes on, so a step is ordered against
    PyTorch's work on the GPU instead of by host synchronisations (:func:`run_bound`).
    Pure logic (no ONNX Runtime import), tested everywhere.
    """
    if choice not in ("auto", *PROVIDERS):
        raise ParameterError(
            f"unknown ONNX Runtime provider {choice!r}", "pass --backend-opt provider=auto|cpu|cuda|tensorrt"
        )
    if choice == "auto":
        choice = "cuda" if device.startswith("cuda") else "cpu"
    if choice == "cpu":
        return [PROVIDERS["cpu"]]
    if not device.startswith("cuda"):
        raise ParameterError(f"the {choice} provider runs on a GPU, not on {device}", "pass --device cuda")
    device_id = int(device.partition(":")[2] or 0)
    # HEURISTIC: cuDNN's own pick per convolution shape; ONNX Runtime's default (EXHAUSTIVE) times every
    # algorithm for each new shape, seconds per shape, and a tiled or multi-size job meets many shapes.
    cuda: dict[str, Any] = {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC"}
    if stream and choice == "cuda":
        cuda["user_compute_stream"] = str(stream)  # ONNX Runtime treats 0 as "none": its own stream
    chain: list[Any] = [(PROVIDERS["cuda"], cuda), PROVIDERS["cpu"]]
    if choice == "tensorrt":
        options: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": fp16}
        if cache_dir is not None:
            # ONNX Runtime names its engines by a hash of the file name, the graph's names and versions,
            # never the weights: two fine-tunes of one architecture (both "model.onnx") would load each
            # other's engine. So each export gets its own engine folder; the timing cache (tactic timings,
            # not weights) is shared by every export on the GPU.
            options |= {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache_dir),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache_dir.parent / "timing"),
            }
        if profile is not None:
            options |= profile_options(profile)
        chain.insert(0, (PROVIDERS["tensorrt"], options))
    return chain


def profile_options(profile: Profile) -> dict[str, str]:
    """``trt_profile_min/opt/max_shapes`` for ``profile``: ``"sample:2x4x8x8,timestep:2"``, every input."""

    def shapes(index: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, s[index]))}" for name, s in sorted(profile.shapes.items()))

    return {f"trt_profile_{which}_shapes": shapes(i) for i, which in enumerate(("min", "opt", "max"))}


#: The first ONNX Runtime whose TensorRT provider is built against TensorRT 11 (its API dropped the
#: implicitly typed builder and precision flags that older providers call).
ORT_FOR_TENSORRT_11 = (1, 27)


def check_tensorrt_provider(ort_version: str, tensorrt_version: str | None) -> None:
    """Refuse the TensorRT provider of an ONNX Runtime older than 1.27 beside TensorRT 11, in one line."""
    if tensorrt_version is None or int(tensorrt_version.split(".")[0]) < 11:
        return
    if tuple(int(part) for part in ort_version.split(".")[:2]) < ORT_FOR_TENSORRT_11:
        raise BackendUnavailableError(
            f"onnxruntime {ort_version}'s TensorRT provider cannot use TensorRT {tensorrt_version}",
            "pip install 'onnxruntime-gpu>=1.27', or use --backend-opt provider=cuda or --backend tensorrt",
        )


def _installed_tensorrt() -> str | None:
    import importlib.metadata

    for name in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_libs"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def engine_cache_dir(path: Path) -> Path:
    """The TensorRT EP's engine folder for the ONNX file ``path``: one per cache entry (its name and key),
    else one per file (its resolved path, size and modification time)."""
    import hashlib

    from difftool.exporters.cache import MANIFEST, cache_root

    if (path.parent / MANIFEST).is_file():  # an entry of the artifact cache: <name>-<key> is unique
        return cache_root() / "ort-tensorrt" / path.parent.name
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return cache_root() / "ort-tensorrt" / f"file-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def make_session(
    path: Path,
    device: str,
    fp16: bool = False,
    provider: str = "auto",
    threads: int = 0,
    profile: Profile | None = None,
) -> Any:
    """An ONNX Runtime session for ``path`` on ``device``; the same one again while the file is unchanged."""
    stat = path.stat() if path.is_file() else None
    if stat is None:
        return _new_session(path, device, fp16, provider, threads, profile)
    shapes = None if profile is None else repr(profile.as_json())
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, device, fp16, provider, threads, shapes)
    sessions = current().cache("ort-sessions", lambda: Recent(6))
    return sessions.get(key, lambda: _new_session(path, device, fp16, provider, threads, profile))


def check_providers(chain: list[Any], active: list[str]) -> None:
    """Refuse a session whose first requested provider did not load (ONNX Runtime falls back silently).

    A CUDA or TensorRT provider that is compiled in but fails to load (a missing cuDNN, a driver
    mismatch) leaves a CPU session behind; binding CUDA pointers to it would crash or lie.
    """
    wanted = chain[0] if isinstance(chain[0], str) else chain[0][0]
    if wanted not in active:
        raise BackendUnavailableError(
            f"ONNX Runtime could not load {wanted} (the session runs on {', '.join(active) or 'nothing'})",
            "check the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs, or run with --device cpu",
        )


#: Each CUDA session's own stream (see :func:`run_bound`), kept for the session's life.
_STREAMS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _new_session(
    path: Path, device: str, fp16: bool, provider: str = "auto", threads: int = 0, profile: Profile | None = None
) -> Any:
    import onnxruntime as ort

    from difftool.core.cuda import runtime

    engines = engine_cache_dir(path) if provider == "tensorrt" else None
    chain = provider_chain(device, provider, fp16, engines, profile)
    if engines is not None and chain[0][0] == PROVIDERS["tensorrt"]:
        check_tensorrt_provider(ort.__version__, _installed_tensorrt())
        engines.mkdir(parents=True, exist_ok=True)
        (engines.parent / "timing").mkdir(parents=True, exist_ok=True)
    wanted = chain[0] if isinstance(chain[0], str) else chain[0][0]
    available = ort.get_available_providers()
    missing = [p if isinstance(p, str) else p[0] for p in chain]
    missing = [name for name in missing if name not in available]
    if missing:
        fix = "install onnxruntime-gpu (pip install 'difftool[onnx-gpu]')" if wanted != PROVIDERS["cpu"] else ""
        raise BackendUnavailableError(
            f"ONNX Runtime has no {', '.join(missing)} here (available: {', '.join(available)})",
            fix or "reinstall onnxruntime",
        )
    stream = None
    if isinstance(chain[0], tuple) and chain[0][0] == PROVIDERS["cuda"]:
        # The CUDA provider runs on a stream of ours (not PyTorch's default stream, handle 0, which ONNX
        # Runtime takes for "none"): run_bound orders it against PyTorch's stream on the GPU.
        stream = runtime().new_stream(device)
        chain = provider_chain(device, provider, fp16, engines, profile, stream.cuda_stream)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=chain)
    check_providers(chain, session.get_providers())
    if stream is not None and "user_compute_stream" in chain[0][1]:
        _STREAMS[session] = stream
    return session


class OnnxRuntimeDenoiser(Denoiser):
    backend = "onnxruntime"

    def __init__(
        self,
        path: Path,
        signature: UNetSignature,
        *,
        prediction_type: str,
        sample_channels: int,
        device: str = "cpu",
        fp16: bool = False,
        provider: str = "auto",
        threads: int = 0,
        residuals: Any = None,
        shapes: Any = None,
    ) -> None:
        """``residuals``: the :class:`~difftool.exporters.onnx_controlnet.Residuals` a residual-input U-Net takes;
        ``shapes``: the task's declared :class:`~difftool.core.params.ExportShapes` (its TensorRT profile)."""
        from difftool.core.cuda import runtime
        from difftool.runtimes.tensorrt.profiles import signature_profile

        profile = None
        if shapes is not None and residuals is None and provider == "tensorrt":  # only that provider builds engines
            profile = signature_profile(signature, shapes.batch, shapes.size, shapes.tokens)
        self.session = make_session(path, device, fp16, provider, threads, profile)
        self.providers = list(self.session.get_providers())
        self.signature = signature
        self.in_channels = signature.in_channels
        self.sample_channels = sample_channels
        self.prediction_type = prediction_type
        self.device = runtime().placement(device)
        self.dtype = torch.float16 if fp16 else torch.float32  # the graph's precision; its I/O is fp32
        self.path = path
        self.residuals = residuals

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        inputs = graph_inputs(self.signature, sample, timestep, cond, self.device)
        x = inputs["sample"]
        if self.residuals is not None:  # the U-Net taking ControlNet residuals
            from difftool.exporters.onnx_controlnet import residual_inputs

            inputs |= residual_inputs(self.residuals, cond, x, self.device)
        out = torch.empty((x.shape[0], self.signature.out_channels, *x.shape[2:]), device=self.device)
        run_bound(self.session, inputs, {"out": out}, self.device)
        return out.to(sample.dtype)


#: ONNX Runtime's run option that skips the host wait for the providers' streams at the end of a run.
NO_SYNC = "disable_synchronize_execution_providers"


def run_bound(session: Any, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], device: Any) -> None:
    """Run ``session`` reading ``inputs`` and writing ``outputs`` in place (torch tensors bound by pointer).

    A CUDA session on a stream of ours (:data:`_STREAMS`) is ordered on the GPU: its stream waits for
    PyTorch's current stream (the inputs written), PyTorch's waits for it (the outputs), and ONNX
    Runtime is told not to wait for its stream on the host. Other GPU sessions (the TensorRT provider's
    own streams) wait for PyTorch on the host first and ONNX Runtime waits for them at the end.
    """
    import onnxruntime as ort

    from difftool.core.cuda import runtime

    kind, index = device.type, device.index or 0
    binding = session.io_binding()
    for name, tensor in inputs.items():
        binding.bind_input(name, kind, index, _NUMPY_TYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
    for name, tensor in outputs.items():
        binding.bind_output(name, kind, index, np.float32, tuple(tensor.shape), tensor.data_ptr())
    if kind != "cuda":
        session.run_with_iobinding(binding)
        return
    cuda = runtime()
    current = cuda.current_stream(f"cuda:{index}")
    stream = _STREAMS.get(session)
    if stream is None:  # ONNX Runtime runs on streams we do not know: the inputs must be written first
        current.synchronize()
        session.run_with_iobinding(binding)
        return
    stream.wait_stream(current)
    options = ort.RunOptions()
    options.add_run_config_entry(NO_SYNC, "1")
    session.run_with_iobinding(binding, options)
    current.wait_stream(stream)
