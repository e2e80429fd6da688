"""A ControlNet on ONNX Runtime: the ``onnx`` backend's ControlNet runner (see
:class:`difftool.plugins.builtin.sd.control_backend.ControlNetRunner`).

Runs the cached, validated export of :mod:`difftool.exporters.onnx_controlnet` (raw residuals out);
inputs and outputs are torch tensors bound by pointer, as the U-Net's denoiser binds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difftool.exporters.onnx import graph_inputs
from difftool.exporters.onnx_controlnet import ControlNetSignature, cached_controlnet
from difftool.runtimes.onnxruntime.denoiser import make_session, run_bound


def controlnet_inputs_for(
    signature: ControlNetSignature, sample: Any, timestep: Any, text: Any, image: Any, added: Any, device: Any
) -> dict[str, torch.Tensor]:
    """The exported ControlNet's inputs by name (contiguous fp32 on ``device``); shared with TensorRT."""
    cond = {"encoder_hidden_states": text, "added_cond_kwargs": added}
    inputs = graph_inputs(signature.unet, sample, timestep, cond, device)
    inputs["controlnet_cond"] = image.to(device, torch.float32).contiguous()
    names = signature.input_names()
    return {name: inputs[name] for name in names}


def residual_outputs(signature: ControlNetSignature, sample: torch.Tensor, device: Any) -> dict[str, torch.Tensor]:
    """Empty fp32 tensors for every residual of a ControlNet call on ``sample``."""
    batch, _, height, width = sample.shape
    shapes = signature.residuals.shapes(batch, height, width)
    return {name: torch.empty(s, device=device) for name, s in zip(signature.residuals.names, shapes, strict=True)}


class OnnxRuntimeControlNet:
    """``runner(sample, timestep, text, image, added) -> (down, mid)`` over an ONNX Runtime session."""

    backend = "onnxruntime"

    def __init__(
        self,
        path: Path,
        signature: ControlNetSignature,
        *,
        device: str = "cpu",
        provider: str = "auto",
        threads: int = 0,
    ) -> None:
        from difftool.core.cuda import runtime

        self.session = make_session(path, device, False, provider, threads)
        self.signature, self.path = signature, path
        self.device = runtime().placement(device)

    def __call__(self, sample: Any, timestep: Any, text: Any, image: Any, added: Any) -> tuple[list[Any], Any]:
        inputs = controlnet_inputs_for(self.signature, sample, timestep, text, image, added, self.device)
        outputs = residual_outputs(self.signature, inputs["sample"], self.device)
        run_bound(self.session, inputs, outputs, self.device)
        *down, mid = outputs.values()
        return down, mid


def onnx_controlnet(module: Any, *, model_id: str, device: str, options: Any) -> OnnxRuntimeControlNet:
    """The ``onnx`` backend's runner for ``module``: exported and validated on first use, then cached."""
    entry, signature = cached_controlnet(module, model_id)
    return OnnxRuntimeControlNet(
        entry.file("model.onnx"),
        signature,
        device=device,
        provider=options["provider"],
        threads=int(options["threads"]),
    )
