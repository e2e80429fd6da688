"""``inpaint`` for SD3 and Flux, step for step as diffusers' pipelines:

- Flux.1 Fill (``flux-fill``) as ``FluxFillPipeline``: the transformer sees the packed latents, the masked
  image's latents (the hole set to mid-grey) and the pixel mask folded into 8 x 8 = 64 channels per latent
  pixel (384 input features), as a ``concat`` conditioning.
- SD 3 / 3.5 as ``StableDiffusion3InpaintPipeline`` and Flux.1 dev / schnell as ``FluxInpaintPipeline``:
  an ordinary transformer, and after every step the known region is put back, noised to the next step's
  level (latent blending, as difftool does for ordinary SD checkpoints).

Random draws follow diffusers: the input's VAE sample, then the noise, then (Fill) the masked image's sample.
The mask, ``--dilate``, ``--feather``, ``--extend``, ``--only-masked`` and the compositing are the SD
path's (:mod:`difftool.plugins.builtin.inpaint`): white (non-zero) is repainted, the result is
composited over the input so pixels outside the feathered mask keep the input's bytes, and a size
that is not a multiple of 16 is padded (edge pixels) and cropped back rather than resized.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from difftool.core.images import LoadedImage, to_pil, to_uint8
from difftool.core.params import Params
from difftool.core.task import RunContext, TaskRequest, TaskResult

#: Unset ``--context`` and ``--strength`` (``None``: the model's own), as for Stable Diffusion models.
DEFAULT_CONTEXT, DEFAULT_STRENGTH = 64, 1.0


def inpaint(request: TaskRequest, context: RunContext, model: Any) -> TaskResult:
    from difftool.plugins.builtin.flow.samplers import shift_record
    from difftool.plugins.builtin.masks import dilate, feather
    from difftool.plugins.builtin.sd.inpaint import extend_canvas, requested_mask
    from difftool.plugins.builtin.sd.tasks import DEFAULT_STEPS

    params = request.params
    image: LoadedImage = request.inputs["image"]
    mask, extend = requested_mask(params, image)
    rgb, alpha, mask = extend_canvas(image.rgb, image.alpha, mask, extend)
    mask = dilate(mask, params.dilate)
    weight = feather(mask, params.feather)
    height, width = mask.shape
    params = params.replace(steps=params.steps or DEFAULT_STEPS)  # None: Stable Diffusion's default, as SD models
    strength = DEFAULT_STRENGTH if params.strength is None else float(params.strength)
    record = {"task": "inpaint", "size": f"{width}x{height}", "steps": params.steps, "strength": strength}
    record |= {"scheduler": _scheduler(params, model), **model.record()}
    record |= shift_record(model, params.shift, (width, height))  # the sampled crop's, with --only-masked
    if model.family.guidance_embeds:
        record["distilled_guidance"] = float(params.guidance_scale)
    if not weight.any():
        context.logger.warning("the mask is empty: the image is returned unchanged")
        return TaskResult([to_pil(rgb, alpha)], record)
    repaint = _only_masked if params.only_masked else padded
    painted = repaint(model, rgb, mask, params, context)
    original = to_uint8(rgb)
    w = weight[..., None]
    blended = to_uint8(rgb * (1 - w) + painted * w)
    result = np.where(w > 0, blended, original)  # zero weight: the input's exact bytes (no VAE round trip)
    return TaskResult([to_pil(result.astype(np.float32) / 255.0, alpha)], record)


def _scheduler(params: Params, model: Any) -> str:
    from difftool.plugins.builtin.flow.scheduler import run_scheduler

    return run_scheduler(params.scheduler, model.family.label)


def padded(model: Any, rgb: np.ndarray, hole: np.ndarray, params: Params, context: RunContext) -> np.ndarray:
    """:func:`paint` on the image padded (edge pixels) to the transformer's multiple (16 px), cropped back."""
    height, width = hole.shape
    step = model.vae_scale * 2  # VAE downsampling x the 2 x 2 patches
    pad_h, pad_w = (-height) % step, (-width) % step
    if pad_h or pad_w:
        rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        hole = np.pad(hole, ((0, pad_h), (0, pad_w)), mode="edge")
    return paint(model, rgb, hole, params, context)[:height, :width]


def _only_masked(model: Any, rgb: np.ndarray, hole: np.ndarray, params: Params, context: RunContext) -> np.ndarray:
    """Repaint a crop around the mask (+ ``--context``) at the family's native size, then scale it back (as the
    SD path's ``--only-masked``)."""
    from PIL import Image

    from difftool.plugins.builtin.masks import crop_box
    from difftool.plugins.builtin.sd.inpaint import _resize

    margin = DEFAULT_CONTEXT if params.context is None else params.context
    y0, y1, x0, x1 = crop_box(hole > 0, margin, (hole.shape[1], hole.shape[0]))
    crop_h, crop_w = y1 - y0, x1 - x0
    scale, step = model.family.native_size / max(crop_h, crop_w), model.vae_scale * 2
    work = (max(step, round(crop_w * scale / step) * step), max(step, round(crop_h * scale / step) * step))
    crop = _resize(rgb[y0:y1, x0:x1], work, Image.Resampling.LANCZOS)
    crop_hole = (_resize(hole[y0:y1, x0:x1, None], work, Image.Resampling.BILINEAR)[..., 0] > 0).astype(np.float32)
    out = rgb.copy()
    out[y0:y1, x0:x1] = _resize(paint(model, crop, crop_hole, params, context), (crop_w, crop_h),
                                Image.Resampling.LANCZOS)  # fmt: skip
    return out


def fill_mask(hole: Any, scale: int) -> Any:
    """(1, 1, H, W) pixel mask -> (1, scale * scale, H / scale, W / scale): each latent pixel's block of mask
    pixels as channels (``FluxFillPipeline.prepare_mask_latents``)."""
    _, _, height, width = hole.shape
    h, w = height // scale, width // scale
    return hole.reshape(1, h, scale, w, scale).permute(0, 2, 4, 1, 3).reshape(1, scale * scale, h, w)


def paint(model: Any, rgb: np.ndarray, hole: np.ndarray, params: Params, context: RunContext) -> np.ndarray:
    """One run on an image whose sides are multiples of 16: the painted image, H x W x 3 in [0, 1]."""
    import torch
    import torch.nn.functional as F

    from difftool.core.sampler import make_noise
    from difftool.plugins.builtin.flow import pipeline
    from difftool.plugins.builtin.sd.models import split_loras
    from difftool.plugins.builtin.sd.pipeline import to_numpy

    height, width = hole.shape
    strength = DEFAULT_STRENGTH if params.strength is None else float(params.strength)
    mask = torch.from_numpy(hole.astype(np.float32))[None, None]
    source = rgb
    if strength < 1.0 and params.fill == "blur":  # A1111's "masked content: fill", as for SD models
        from difftool.plugins.builtin.masks import push_pull_fill

        filled = push_pull_fill(torch.from_numpy(rgb).permute(2, 0, 1)[None], 1 - mask)
        source = filled[0].permute(1, 2, 0).numpy()
    prompt = split_loras(str(params.prompt or ""))[0]  # the <lora:...> tags were merged at load
    text = pipeline.encode(model, prompt, params.negative_prompt or "", float(params.guidance_scale), context,
                           params.true_cfg)  # fmt: skip
    # diffusers' draw order: the input's VAE sample (even at strength 1), the noise, then the masked image's.
    init = pipeline.encode_image(model, source, context)
    latent = (height // model.vae_scale, width // model.vae_scale)
    noise = make_noise((1, init.shape[1], *latent), context, init.device, torch.float32)
    hook_for = None
    if model.family.inpainting:  # Fill: the hole at 0 in [-1, 1] (mid-grey), then the mask, as inputs
        masked = pipeline.encode_image(model, np.where(hole[..., None] > 0, 0.5, source).astype(np.float32), context)
        text.cond["concat"] = torch.cat([masked, fill_mask(mask, model.vae_scale).to(masked.device)], dim=1)
    else:
        latent_mask = F.interpolate(mask, size=latent).to(init.device)

        def hook_for(scheduler: Any) -> Any:
            def blend(i: int, next_t: Any, x: Any) -> Any:
                known = init.to(x.device)
                if next_t is not None:
                    known = scheduler.add_noise(known, noise.to(x.device), next_t)
                return (1 - latent_mask.to(x.device)) * known + latent_mask.to(x.device) * x

            return blend

    latents = pipeline.sample_latents(
        model, text, context, size=(width, height), steps=int(params.steps), scheduler=_scheduler(params, model),
        init=init if strength < 1.0 else None, strength=strength, noise=noise, step_hook_for=hook_for,
        shift=params.shift,
    )  # fmt: skip
    return to_numpy(pipeline.decode(model, latents, context))
