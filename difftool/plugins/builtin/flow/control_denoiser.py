"""The transformer with ControlNet residuals: each call runs the active units' ControlNets (prepared by
:mod:`.controlled`) on the same sample, timestep and text, and passes their summed residuals on to the
transformer in the conditioning, under diffusers' argument names (see :data:`.denoiser.RESIDUAL_KEYS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from difftool.core.denoiser import Conditioning, Denoiser
from difftool.plugins.builtin.flow.denoiser import image_ids, pack


class ControlledFlowDenoiser(Denoiser):
    """``inner`` (a :class:`~.denoiser.TransformerDenoiser`) with the units' ControlNet residuals added to its
    conditioning at every call. ``scheduler`` gives the planned timesteps (the keep schedule's fractions).
    Create one per sampling run: it counts its calls as the step index, as diffusers' loop does."""

    def __init__(self, inner: Any, controls: Sequence[Any], scheduler: Any) -> None:
        self.inner, self.controls, self.scheduler = inner, list(controls), scheduler
        for name in ("sample_channels", "in_channels", "prediction_type", "dtype", "device", "backend"):
            setattr(self, name, getattr(inner, name))
        self.calls = 0

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        step, total = self.calls, len(self.scheduler.timesteps)
        self.calls += 1
        # diffusers: keep = 1 - (i / n < start or (i + 1) / n > end); a dropped unit adds zeros
        active = [c for c in self.controls if c.unit.weight and c.unit.start <= step / total]
        active = [c for c in active if (step + 1) / total <= c.unit.end]
        if not active:
            return self.inner(sample, timestep, cond)
        with torch.inference_mode():
            run = self._flux if self.inner.arch == "flux" else self._sd3
            residuals = run(active, sample, timestep, cond)
        return self.inner(sample, timestep, {**cond, **residuals})

    def _flux(self, controls: list[Any], sample: Any, timestep: Any, cond: Conditioning) -> dict[str, Any]:
        device, dtype = self.inner.device, self.inner.dtype
        x = sample.to(device, dtype)
        batch, (h, w) = x.shape[0], x.shape[-2:]
        t = torch.as_tensor(timestep, dtype=torch.float32, device=device).reshape(-1).expand(batch).to(dtype) / 1000
        text = cond["encoder_hidden_states"].to(device, dtype)
        common = {
            "hidden_states": pack(x), "timestep": t, "pooled_projections": cond["pooled_projections"].to(device, dtype),
            "encoder_hidden_states": text, "txt_ids": torch.zeros(text.shape[1], 3, device=device, dtype=dtype),
            "img_ids": image_ids(h // 2, w // 2, device, dtype), "return_dict": False,
        }  # fmt: skip
        blocks: list[Any] | None = None
        singles: list[Any] | None = None
        for control in controls:
            net = control.net.module
            guidance = torch.full((batch,), control.guidance, device=device) if net.config.guidance_embeds else None
            mode = None if control.mode is None else torch.full((batch, 1), control.mode, device=device)
            image = control.cond.to(device, dtype)
            image = image.expand(batch, *image.shape[1:])
            b, s = net(controlnet_cond=image, controlnet_mode=mode, conditioning_scale=control.unit.weight,
                       guidance=guidance, **common)  # fmt: skip
            blocks = _summed(blocks, b)
            singles = _summed(singles, s)
        repeat = self.controls[0].net.module.input_hint_block is not None  # XLabs: its few blocks repeat
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles,
                "controlnet_blocks_repeat": repeat}  # fmt: skip

    def _sd3(self, controls: list[Any], sample: Any, timestep: Any, cond: Conditioning) -> dict[str, Any]:
        device, dtype = self.inner.device, self.inner.dtype
        x = sample.to(device, dtype)
        batch = x.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32, device=device).reshape(-1).expand(batch)
        pooled = cond["pooled_projections"].to(device, dtype)
        text = cond["encoder_hidden_states"].to(device, dtype)
        blocks: list[Any] | None = None
        for control in controls:
            net = control.net.module
            image = control.cond.to(device, dtype)
            out = net(
                hidden_states=x, timestep=t, controlnet_cond=image.expand(batch, *image.shape[1:]),
                encoder_hidden_states=text if net.config.joint_attention_dim is not None else None,
                pooled_projections=torch.zeros_like(pooled) if net.config.force_zeros_for_pooled_projection else pooled,
                conditioning_scale=control.unit.weight, return_dict=False,
            )[0]  # fmt: skip
            blocks = _summed(blocks, out)
        return {"block_controlnet_hidden_states": blocks}


def _summed(total: list[Any] | None, more: Sequence[Any] | None) -> list[Any] | None:
    if more is None:
        return total
    return list(more) if total is None else [a + b for a, b in zip(total, more, strict=True)]
