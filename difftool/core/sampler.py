"""The one denoising loop every task and backend runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from difftool.core.denoiser import Conditioning, Denoiser
from difftool.core.scheduler import Scheduler
from difftool.core.task import RunContext

#: ``hook(index, next_t, sample) -> sample``, called after every step; ``next_t`` is ``None`` after the
#: last one. Inpainting uses it to put back the known region at the next noise level.
StepHook = Callable[[int, "torch.Tensor | None", torch.Tensor], torch.Tensor]
#: Turns a predicted clean sample into a preview image (PIL) for the progress callback.
PreviewDecoder = Callable[[torch.Tensor], Any]


def _batch_conditioning(uncond: Conditioning, cond: Conditioning) -> dict[str, Any]:
    """Concatenate unconditional and conditional inputs along the batch, once, before the loop."""
    merged: dict[str, Any] = {}
    for key in cond:
        a, b = uncond.get(key), cond[key]
        if isinstance(b, Mapping):
            merged[key] = _batch_conditioning(a or {}, b)
        elif isinstance(b, torch.Tensor) and b.ndim > 0:
            merged[key] = torch.cat([a if a is not None else b, b], dim=0)
        else:
            merged[key] = b
    return merged


def make_noise(shape: tuple[int, ...], context: RunContext, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise from the run's generator, drawn on the CPU so a seed means the same on every device."""
    return torch.randn(shape, generator=context.generator, dtype=torch.float32).to(device, dtype)


def sample(
    denoiser: Denoiser,
    scheduler: Scheduler,
    *,
    steps: int,
    context: RunContext,
    shape: tuple[int, ...] | None = None,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    init_noised: bool = False,
    cond: Conditioning | None = None,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    noise: torch.Tensor | None = None,
    step_hook: StepHook | None = None,
    decode_preview: PreviewDecoder | None = None,
) -> torch.Tensor:
    """Denoise from noise (``shape``) or from ``init`` noised to ``strength``; return the final sample.

    Classifier-free guidance (``uncond`` given and ``guidance_scale`` != 1) runs both branches as one
    batched denoiser call. ``context.cancel`` is checked before every step, progress reported after it.
    No step reads a value back to the host unless a preview is due. ``init_noised``: ``init`` is already
    at the first timestep's noise level (another run's unfinished sample, e.g. an SDXL base's latents
    handed to its refiner): it is denoised as it is, and no noise is drawn for it.
    """
    if init is None and shape is None:
        raise ValueError("sample() needs a shape or an init sample")
    scheduler.set_timesteps(steps, strength=strength if init is not None else 1.0)
    timesteps = scheduler.timesteps
    device, dtype = denoiser.device, torch.float32
    if init is not None and init_noised:
        x = init.to(device, dtype)
    elif init is not None:  # img2img: start from init noised to the first planned timestep
        if noise is None:
            noise = make_noise(tuple(init.shape), context, device, dtype)
        x = scheduler.add_noise(init.to(device, dtype), noise, timesteps[:1])
    else:
        if noise is None:
            noise = make_noise(tuple(shape), context, device, dtype)
        x = noise * scheduler.init_noise_sigma

    cond = dict(cond or {})
    guided = uncond is not None and guidance_scale != 1.0
    model_cond = _batch_conditioning(uncond, cond) if guided else cond
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        context.cancel.raise_if_cancelled()
        model_in = scheduler.scale_model_input(x, t)
        if guided:
            out_uncond, out_cond = denoiser(torch.cat([model_in, model_in]), t, model_cond).chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        else:
            out = denoiser(model_in, t, model_cond)
        result = scheduler.step(out, t, x, generator=context.generator)
        x = result.prev_sample
        if step_hook is not None:
            x = step_hook(i, timesteps[i + 1] if i + 1 < total else None, x)
        preview = None
        if (
            decode_preview is not None
            and context.preview_every
            and result.pred_original_sample is not None
            and ((i + 1) % context.preview_every == 0 or i + 1 == total)
        ):
            preview = decode_preview(result.pred_original_sample)
        context.report(i + 1, total, preview)
    return x
