"""SD3's and Flux's transformers behind the core Denoiser interface.

The sampler's sample stays an ordinary latent image (batch, 16, h, w), so core draws noise and steps the
scheduler exactly as for a U-Net. Flux's 2 x 2 patch packing, its latent position ids and its all-zero
text ids are made here, per call; the timestep is divided by 1000 as Flux expects. Conditioning keys
read (see :mod:`difftool.core.denoiser`): ``encoder_hidden_states``, ``pooled_projections`` and, for a
guidance-distilled Flux, ``guidance`` (one scale per batch item; no unconditional batch is needed).
"""

from __future__ import annotations

from typing import Any

import torch

from difftool.core.denoiser import Conditioning, Denoiser, copied_to
from difftool.plugins.builtin.flow.gguf_files import is_quantised
from difftool.plugins.builtin.flow.scheduler import FLOW_PREDICTION

#: ControlNet residuals passed on to the transformer when the conditioning holds them (flow.controlled).
RESIDUAL_KEYS = {
    "sd3": ("block_controlnet_hidden_states",),
    "flux": ("controlnet_block_samples", "controlnet_single_block_samples", "controlnet_blocks_repeat"),
}


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) -> (b, h/2 * w/2, 4c): Flux's 2 x 2 patches as tokens (diffusers' ``_pack_latents``)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, features = tokens.shape
    x = tokens.view(b, h // 2, w // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, features // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Each patch token's (0, row, column) for Flux's rotary embedding."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device, dtype)


class TransformerDenoiser(Denoiser):
    """A diffusers ``SD3Transformer2DModel`` (``arch="sd3"``) or ``FluxTransformer2DModel`` (``"flux"``)."""

    backend = "torch"

    def __init__(
        self, module: Any, *, arch: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        from difftool.core.cuda import runtime

        self.device = runtime().placement(str(device))
        self.dtype = dtype
        self.arch = arch
        first = next(iter(module.parameters()))
        if getattr(module, "_difftool_storage_dtype", None) is not None or is_quantised(module):
            # fp8 kept in fp8 and cast layer by layer (flow.fp8), GGUF dequantised layer by layer
            # (flow.gguf_files): moved, never copied (a copy would drop the quantisation), in the dtype set up.
            torch.nn.Module.to(module, device=self.device)
        elif first.device != self.device or first.dtype != dtype:
            module = copied_to(module, self.device, dtype)
        self.module = module.eval().requires_grad_(False)
        channels = int(module.config.out_channels or module.config.in_channels)
        self.sample_channels = channels // 4 if arch == "flux" else channels
        self.in_channels = int(module.config.in_channels) // 4 if arch == "flux" else channels  # Fill: 96 (16 + 80)
        self.prediction_type = FLOW_PREDICTION
        self.guidance_embeds = bool(getattr(module.config, "guidance_embeds", False))

    @torch.inference_mode()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = sample.to(self.device, self.dtype)
        batch = x.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32, device=self.device).reshape(-1).expand(batch)
        text = cond["encoder_hidden_states"].to(self.device, self.dtype)
        pooled = cond["pooled_projections"].to(self.device, self.dtype)
        residuals = {key: cond[key] for key in RESIDUAL_KEYS[self.arch] if key in cond}
        if self.arch == "sd3":
            out = self.module(
                hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled, return_dict=False,
                **residuals,
            )[0]  # fmt: skip
            return out.to(sample.dtype)
        h, w = x.shape[-2:]
        guidance = None
        if self.guidance_embeds:
            scale = cond.get("guidance")
            scale = torch.full((1,), 1.0) if scale is None else torch.as_tensor(scale, dtype=torch.float32)
            guidance = scale.reshape(-1).to(self.device).expand(batch)
        if cond.get("concat") is not None:  # Flux Fill: masked-image latents and the 8 x 8 pixel mask, packed too
            x = torch.cat([x, cond["concat"].to(self.device, self.dtype).expand(batch, -1, -1, -1)], dim=1)
        out = self.module(
            hidden_states=pack(x),
            timestep=t.to(self.dtype) / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=self.device, dtype=self.dtype),
            img_ids=image_ids(h // 2, w // 2, self.device, self.dtype),
            return_dict=False,
            **residuals,
        )[0]
        return unpack(out, h, w).to(sample.dtype)
