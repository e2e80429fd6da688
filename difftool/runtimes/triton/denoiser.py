"""A :class:`~difftool.core.denoiser.Denoiser` that calls a Triton Inference Server over gRPC.

``--backend triton`` with the backend option ``url`` (``host:8001`` or ``unix:/path``) pointing at a
server that serves a repository written by ``difftool export triton``. The server model is chosen by
its ``difftool_weights`` config parameter, so only a model exported from the same weights is used;
its inputs must match the U-Net's signature. Each denoiser call is one ``ModelInfer`` request.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from difftool.core.denoiser import Conditioning, Denoiser
from difftool.core.errors import BackendUnavailableError, ModelError
from difftool.exporters.onnx import UNetSignature, check_channels

WEIGHTS_PARAMETER = "difftool_weights"


def find_model(client: Any, weights_id: str) -> str:
    """The name of the ready server model whose ``difftool_weights`` parameter is ``weights_id``."""
    names = [m.name for m in client.get_model_repository_index().models]
    for name in names:
        config = client.get_model_config(name).config
        if config.parameters[WEIGHTS_PARAMETER].string_value == weights_id and client.is_model_ready(name):
            return name
    raise ModelError(
        f"the Triton server serves no model exported from these weights ({weights_id[:12]}; it has: "
        f"{', '.join(names) or 'none'})",
        "export it with `difftool export triton TASK -o REPO` and load REPO on the server",
    )


class TritonDenoiser(Denoiser):
    backend = "triton"

    def __init__(self, url: str, weights_id: str, signature: UNetSignature, *, prediction_type: str) -> None:
        from tritonclient.grpc import InferenceServerClient

        self.client = InferenceServerClient(url=url)
        try:
            self.model = find_model(self.client, weights_id)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - tritonclient raises its own error types for a dead server
            raise BackendUnavailableError(
                f"cannot reach the Triton server at {url}: {str(exc).splitlines()[0] if str(exc) else exc}",
                "start it, or fix --backend-opt url=HOST:PORT",
            ) from exc
        self.signature = signature
        self.in_channels, self.sample_channels = signature.in_channels, signature.out_channels
        self.prediction_type = prediction_type
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.fingerprint = f"triton:{url}/{self.model}"

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        from tritonclient.grpc import InferInput, InferRequestedOutput

        x = sample.float().cpu()
        if cond.get("concat") is not None:
            x = torch.cat([x, cond["concat"].float().cpu()], dim=1)
        check_channels(self.signature, x)
        batch = x.shape[0]
        arrays: dict[str, np.ndarray] = {
            "sample": np.ascontiguousarray(x.numpy()),
            # one scalar per request row: config.pbtxt declares dims [1] reshaped to []
            "timestep": np.full((batch, 1), float(torch.as_tensor(timestep).reshape(-1)[0]), np.float32),
        }
        if self.signature.class_labels:
            labels = cond["class_labels"].cpu().long()
            arrays["class_labels"] = (labels.expand(batch) if labels.numel() == 1 else labels).numpy().reshape(batch, 1)
        if self.signature.context_dim or self.signature.text_embeds_dim:
            raise ModelError("the Triton backend serves pixel U-Nets only for now", "use --backend onnx or torch")
        inputs = []
        for name, array in arrays.items():
            item = InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32")
            item.set_data_from_numpy(array)
            inputs.append(item)
        result = self.client.infer(self.model, inputs, outputs=[InferRequestedOutput("out")])
        return torch.from_numpy(result.as_numpy("out").copy()).to(sample.dtype)


def unavailable_reason() -> str | None:
    import importlib.util

    if importlib.util.find_spec("tritonclient") is None or importlib.util.find_spec("grpc") is None:
        return "tritonclient[grpc] is not installed; pip install 'difftool[triton]'"
    return None
