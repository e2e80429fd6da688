"""A :class:`~difftool.core.denoiser.Denoiser` over an ONNX Runtime session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difftool.core.denoiser import Conditioning, Denoiser
from difftool.core.errors import BackendUnavailableError
from difftool.exporters.onnx import UNetSignature

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def make_session(path: Path, device: str) -> Any:
    import onnxruntime as ort

    wanted = PROVIDERS["cuda" if device.startswith("cuda") else "cpu"]
    available = ort.get_available_providers()
    if wanted not in available:
        raise BackendUnavailableError(
            f"ONNX Runtime has no {wanted} here (available: {', '.join(available)})",
            "install onnxruntime-gpu for CUDA, or use --device cpu",
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = int(os.environ.get("DIFFTOOL_ORT_THREADS", "0"))
    if threads:
        options.intra_op_num_threads = threads
    providers: list[Any] = (
        [wanted]
        if wanted == "CPUExecutionProvider"
        else [(wanted, {"device_id": int(device.partition(":")[2] or 0)}), "CPUExecutionProvider"]
    )
    return ort.InferenceSession(str(path), options, providers=providers)


class OnnxRuntimeDenoiser(Denoiser):
    backend = "onnxruntime"

    def __init__(
        self, path: Path, signature: UNetSignature, *, prediction_type: str, sample_channels: int, device: str = "cpu"
    ) -> None:
        self.session = make_session(path, device)
        self.signature = signature
        self.in_channels = signature.in_channels
        self.sample_channels = sample_channels
        self.prediction_type = prediction_type
        self.device = torch.device("cpu")  # inputs are handed over through host memory
        self.dtype = torch.float32
        self.path = path

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = sample.float().cpu()
        if cond.get("concat") is not None:
            x = torch.cat([x, cond["concat"].float().cpu()], dim=1)
        feeds = {
            "sample": np.ascontiguousarray(x.numpy()),
            "timestep": np.broadcast_to(np.asarray(timestep, dtype=np.float32).reshape(-1), (x.shape[0],)).copy(),
        }
        if self.signature.class_labels:
            labels = cond.get("class_labels")
            if labels is None:
                raise ValueError("this model needs class_labels conditioning")
            labels = labels.cpu().long().expand(x.shape[0]) if labels.numel() == 1 else labels.cpu().long()
            feeds["class_labels"] = labels.numpy()
        if self.signature.context_dim:
            context = cond.get("encoder_hidden_states")
            if context is None:
                raise ValueError("this model needs encoder_hidden_states conditioning")
            feeds["encoder_hidden_states"] = np.ascontiguousarray(context.float().cpu().numpy())
        if self.signature.text_embeds_dim:
            added = cond.get("added_cond_kwargs") or {}
            for name in ("text_embeds", "time_ids"):
                feeds[name] = np.ascontiguousarray(added[name].float().cpu().numpy())
        out = self.session.run(None, feeds)[0]
        return torch.from_numpy(out).to(sample.dtype)
