"""A :class:`~difftool.core.denoiser.Denoiser` over an ONNX Runtime session.

Inputs and the output are bound to torch tensors by pointer (IO binding), so on a GPU no step copies
through host memory and on the CPU no step converts to numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from difftool.core.denoiser import Conditioning, Denoiser
from difftool.core.errors import BackendUnavailableError, ParameterError
from difftool.core.runtime import current
from difftool.exporters.cache import Recent
from difftool.exporters.onnx import UNetSignature, graph_inputs

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_NUMPY_TYPES = {torch.float32: np.float32, torch.int64: np.int64}


def provider_chain(device: str, choice: str, fp16: bool = False, cache_dir: Path | None = None) -> list[Any]:
    """The provider list for an ``InferenceSession``: the chosen provider first, then its fallbacks.

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
    chain: list[Any] = [(PROVIDERS["cuda"], {"device_id": device_id}), PROVIDERS["cpu"]]
    if choice == "tensorrt":
        options: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": fp16}
        if cache_dir is not None:  # ORT keeps its own engines; keyed by model and GPU inside that folder
            options |= {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache_dir),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache_dir),
            }
        chain.insert(0, (PROVIDERS["tensorrt"], options))
    return chain


def make_session(path: Path, device: str, fp16: bool = False, provider: str = "auto", threads: int = 0) -> Any:
    """An ONNX Runtime session for ``path`` on ``device``; the same one again while the file is unchanged."""
    stat = path.stat() if path.is_file() else None
    if stat is None:
        return _new_session(path, device, fp16, provider, threads)
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, device, fp16, provider, threads)
    sessions = current().cache("ort-sessions", lambda: Recent(6))
    return sessions.get(key, lambda: _new_session(path, device, fp16, provider, threads))


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


def _new_session(path: Path, device: str, fp16: bool, provider: str = "auto", threads: int = 0) -> Any:
    import onnxruntime as ort

    from difftool.exporters.cache import cache_root

    engines = cache_root() / "ort-tensorrt"
    chain = provider_chain(device, provider, fp16, engines)
    if isinstance(chain[0], tuple) and chain[0][0] == PROVIDERS["tensorrt"]:
        engines.mkdir(parents=True, exist_ok=True)
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
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=chain)
    check_providers(chain, session.get_providers())
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
    ) -> None:
        """``residuals``: the :class:`~difftool.exporters.onnx_controlnet.Residuals` a residual-input U-Net takes."""
        from difftool.core.cuda import runtime

        self.session = make_session(path, device, fp16, provider, threads)
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


def run_bound(session: Any, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], device: Any) -> None:
    """Run ``session`` reading ``inputs`` and writing ``outputs`` in place (torch tensors bound by pointer)."""
    kind, index = device.type, device.index or 0
    binding = session.io_binding()
    for name, tensor in inputs.items():
        binding.bind_input(name, kind, index, _NUMPY_TYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
    for name, tensor in outputs.items():
        binding.bind_output(name, kind, index, np.float32, tuple(tensor.shape), tensor.data_ptr())
    if kind == "cuda":  # ONNX Runtime runs on its own stream: the inputs must be written first
        torch.cuda.current_stream(device).synchronize()
    session.run_with_iobinding(binding)
