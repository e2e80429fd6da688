"""The Denoiser interface: one network evaluation, whatever runs it.

Conditioning is a dict with these keys (a backend passes through what it does not use):

``concat``
    Tensor concatenated to the noisy sample along channels (super-resolution's upsampled image,
    inpainting's masked image and mask). Batched like the sample.
``encoder_hidden_states``
    Cross-attention context (text embeddings), batch first.
``added_cond_kwargs``
    A dict of extra tensors (SDXL's ``text_embeds`` and ``time_ids``).
``class_labels``
    Integer class per batch item (difftool's superres model: the scale).
``pooled_projections``
    A pooled text embedding per batch item (transformer denoisers' global conditioning).
``guidance``
    A guidance scale per batch item that the network takes as an input (guidance-distilled models,
    which then need no unconditional batch).

A plugin's model may take more keys: :class:`TorchDenoiser` passes every key but ``concat`` to the module
as a keyword argument (tensors, and tensors in tuples and dicts, placed on its device, floating ones in
its dtype); a backend that runs exported graphs reads the keys it knows and ignores the rest.

The sampler batches classifier-free guidance into one call, so every tensor's batch is the sample's.
A denoiser over another architecture subclasses :class:`Denoiser` and reads the keys it needs: the
sample stays a latent image (batch, channels, h, w) whatever the network tokenizes it into.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

Conditioning = Mapping[str, Any]


class Denoiser(ABC):
    """``denoiser(sample, t, cond) -> model output`` plus what a pipeline needs to know about it."""

    #: Channels of the noisy sample (without ``concat`` conditioning).
    sample_channels: int
    #: Channels the network takes in total (sample + ``concat``).
    in_channels: int
    prediction_type: str
    dtype: torch.dtype
    device: torch.device
    #: ``torch``, ``onnxruntime``, ``tensorrt``, ...
    backend: str

    @abstractmethod
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Model output for ``sample`` at ``timestep`` (scalar or per-batch), in the sample's dtype."""


def copied_to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` with its parameters and buffers on ``device`` in ``dtype`` (floats only).

    Each tensor is converted straight into the copy (through deepcopy's memo), so copying a large
    model to a GPU never holds a second full copy in host memory; ``module`` itself is untouched.
    """
    memo: dict[int, Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        data = tensor.detach().to(device, dtype if tensor.is_floating_point() else None)
        memo[id(tensor)] = (
            torch.nn.Parameter(data, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else data
        )
    return copy.deepcopy(module, memo)


class TorchDenoiser(Denoiser):
    """A :class:`Denoiser` over a PyTorch ``nn.Module`` with the diffusers U-Net call convention."""

    backend = "torch"

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        prediction_type: str,
        sample_channels: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from difftool.core.cuda import runtime

        self.device = runtime().placement(str(device))
        self.dtype = dtype
        first = next(iter(module.parameters()), torch.empty(0))
        if first.dtype != dtype or first.device != self.device:
            # Never cast or move a caller's (often cached) weights in place: an fp32 model cast to bf16
            # would stay bf16-rounded for later runs, and one moved to a GPU would break the next CPU run.
            # Large models avoid the cast by being loaded in the run's dtype (see the SD loader).
            module = copied_to(module, self.device, dtype)
        # channels_last lets oneDNN (CPU) and cuDNN pick their fast convolution kernels. nn.Module.to is
        # called directly: diffusers' override warns on every dtype cast about fp32 modules it keeps.
        self.module = torch.nn.Module.to(module, memory_format=torch.channels_last)
        self.module.eval().requires_grad_(False)
        config = getattr(module, "config", None)
        self.in_channels = int(getattr(config, "in_channels", sample_channels or 0))
        self.sample_channels = int(sample_channels or getattr(config, "out_channels", self.in_channels))
        self.prediction_type = prediction_type

    @torch.inference_mode()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = sample.to(self.device, self.dtype)
        extra = cond.get("concat")
        if extra is not None:
            x = torch.cat([x, extra.to(self.device, self.dtype)], dim=1)
        if self.in_channels and x.shape[1] != self.in_channels:
            from difftool.core.errors import ParameterError

            raise ParameterError(
                f"the model takes {self.in_channels} input channels (sample + concat), got {list(x.shape)}",
                "pass the conditioning this model expects",
            )
        x = x.contiguous(memory_format=torch.channels_last)
        kwargs = {k: self._placed(v) for k, v in cond.items() if k != "concat" and v is not None}
        t = timestep.to(self.device) if isinstance(timestep, torch.Tensor) else torch.tensor(timestep)
        out = self.module(x, t, **kwargs)
        out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
        return out.to(sample.dtype)

    def _placed(self, value: Any) -> Any:
        """A conditioning value on this denoiser's device; floating tensors in its dtype (labels stay integers)."""
        if isinstance(value, torch.Tensor):
            return value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
        if isinstance(value, (tuple, list)):
            return tuple(self._placed(v) for v in value)
        if isinstance(value, Mapping):
            return {k: self._placed(v) for k, v in value.items()}
        return value
