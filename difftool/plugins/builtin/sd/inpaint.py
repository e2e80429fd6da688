"""Inpainting and outpainting with Stable Diffusion models (the ``inpaint`` task's SD path).

9-channel inpainting checkpoints see the mask and the masked image as extra U-Net inputs; ordinary
checkpoints repaint by putting back the known region, noised to the next step's level, after every
step (latent blending). Both follow diffusers' ``StableDiffusionInpaintPipeline`` step for step.
The result is composited over the input, so pixels outside the (feathered) mask are the input's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from difftool.core.errors import ParameterError
from difftool.core.params import Params
from difftool.core.task import RunContext
from difftool.plugins.builtin.sd import pipeline
from difftool.plugins.builtin.sd.models import sd_model_for
from difftool.plugins.builtin.sd.tasks import latent_shapes, prompt_tokens, run_sd

#: What an unset ``--context`` and ``--strength`` (``None``: the model's own) mean for Stable Diffusion models.
DEFAULT_CONTEXT, DEFAULT_STRENGTH = 64, 1.0


def requested_mask(params: Params, image: Any) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The request's mask at ``image``'s size (none for an outpaint: zeros) and its ``--extend``; a request
    with neither is refused in one line."""
    from difftool.plugins.builtin.masks import mask_array

    extend = parse_extend(params.extend)
    if params.mask is None and not any(extend):
        raise ParameterError("inpaint needs a mask", "pass --mask FILE (white = repaint) or --extend L,R,T,B")
    if params.mask is None:
        return np.zeros((image.height, image.width), np.float32), extend
    return mask_array(params.mask, image.size, params.resize_mask), extend


def parse_extend(spec: str | None) -> tuple[int, int, int, int]:
    """``--extend left,right,top,bottom`` in pixels (one number extends every side)."""
    if not spec:
        return (0, 0, 0, 0)
    try:
        values = [int(v) for v in str(spec).split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 4
    if len(values) != 4 or min(values) < 0:
        raise ParameterError(f"--extend {spec!r} is not four pixel counts", "pass --extend LEFT,RIGHT,TOP,BOTTOM")
    return values[0], values[1], values[2], values[3]


def extend_canvas(
    rgb: np.ndarray, alpha: np.ndarray | None, mask: np.ndarray, sides: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Grow the canvas by ``sides``; the new area is filled smoothly from the edges and added to the mask."""
    from difftool.plugins.builtin.masks import push_pull_fill

    left, right, top, bottom = sides
    if not any(sides):
        return rgb, alpha, mask
    pad = ((top, bottom), (left, right))
    known = np.pad(np.ones(mask.shape, np.float32), pad)
    grown = np.pad(rgb, (*pad, (0, 0)))
    filled = push_pull_fill(pipeline.to_tensor(grown), _t(known))
    rgb = pipeline.to_numpy(filled.clamp(-1, 1))
    if alpha is not None:
        alpha = np.pad(alpha, pad, constant_values=1.0)
    return rgb, alpha, np.maximum(np.pad(mask, pad), 1 - known)


def _t(array: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(array.astype(np.float32))[None, None]


def sd_inpaint(rgb: np.ndarray, hole: np.ndarray, params: Params, context: RunContext) -> tuple[np.ndarray, Any]:
    """Repaint ``hole`` (H x W {0, 1}) of ``rgb`` (H x W x 3 in [0, 1]); returns the painted image and model."""
    model = sd_model_for(context, params)
    height, width = hole.shape
    if params.only_masked and any(unit.image is not None for unit in params.control):
        raise ParameterError(
            "--only-masked repaints a crop, which a ControlNet unit's own image does not follow",
            "drop --only-masked, or leave out =IMAGE so the unit sees the (cropped) input",
        )
    if params.only_masked:
        return _only_masked(model, rgb, hole, params, context), model
    pad_h, pad_w = (-height) % 8, (-width) % 8  # the VAE needs multiples of 8: pad, then crop back
    if pad_h or pad_w:
        rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        hole = np.pad(hole, ((0, pad_h), (0, pad_w)), mode="edge")
    painted = paint(model, rgb, hole, params, context)
    return painted[:height, :width], model


def _only_masked(model: Any, rgb: np.ndarray, hole: np.ndarray, params: Params, context: RunContext) -> Any:
    """Repaint a padded crop around the mask at the model's native resolution, then scale it back."""
    from difftool.plugins.builtin.masks import crop_box

    margin = DEFAULT_CONTEXT if params.context is None else params.context
    y0, y1, x0, x1 = crop_box(hole > 0, margin, (hole.shape[1], hole.shape[0]))
    crop_h, crop_w = y1 - y0, x1 - x0
    scale = model.native_size / max(crop_h, crop_w)
    work = (max(8, round(crop_w * scale / 8) * 8), max(8, round(crop_h * scale / 8) * 8))
    crop = _resize(rgb[y0:y1, x0:x1], work, Image.Resampling.LANCZOS)
    crop_hole = (_resize(hole[y0:y1, x0:x1, None], work, Image.Resampling.BILINEAR)[..., 0] > 0).astype(np.float32)
    painted = _resize(paint(model, crop, crop_hole, params, context), (crop_w, crop_h), Image.Resampling.LANCZOS)
    out = rgb.copy()
    out[y0:y1, x0:x1] = painted
    return out


def paint(model: Any, rgb: np.ndarray, hole: np.ndarray, params: Params, context: RunContext) -> np.ndarray:
    """One inpainting run on an image whose sides are multiples of 8 (diffusers' random-draw order)."""
    import torch
    import torch.nn.functional as F

    from difftool.core.sampler import make_noise

    height, width = hole.shape
    strength = DEFAULT_STRENGTH if params.strength is None else params.strength
    image = pipeline.to_tensor(rgb)
    mask = _t(hole)
    if strength < 1.0 and params.fill == "blur":
        from difftool.plugins.builtin.masks import push_pull_fill

        image = push_pull_fill(image, 1 - mask)  # A1111's "masked content: fill"
    nine_channel = model.unet.config.in_channels == 9
    latent_shape = (1, model.vae.config.latent_channels, height // model.vae_scale, width // model.vae_scale)
    image_latents = None
    if not nine_channel or strength < 1.0:
        image_latents = pipeline.encode_image(model, image, context)
    noise = make_noise(latent_shape, context, context.torch_device, torch.float32)
    masked_latents = pipeline.encode_image(model, image * (mask < 0.5), context)
    latent_mask = F.interpolate(mask, size=latent_shape[-2:]).to(context.torch_device)
    scheduler = context.make_scheduler(params.scheduler, model.scheduler_config)  # set by the inpaint task
    extra, step_hook = {}, None
    if nine_channel:
        extra["concat"] = torch.cat([latent_mask, masked_latents.to(context.torch_device)], dim=1)
    else:

        def step_hook(i: int, next_t: Any, x: Any) -> Any:
            known = image_latents.to(x.device)
            if next_t is not None:
                known = scheduler.add_noise(known, noise.to(x.device), next_t)
            return (1 - latent_mask) * known + latent_mask * x

    from difftool.plugins.builtin.sd import controlled

    controls = controlled.controls_for(params, model, context, (width, height), controlled.ControlSource(rgb, hole))
    latents = run_sd(
        model,
        context,
        params,
        controls=controls,
        prompt=params.prompt,
        negative=params.negative_prompt,
        size=(width, height),
        shapes=latent_shapes(
            (width, height),
            params.guidance_scale,
            exact=False,
            tokens=prompt_tokens(params.prompt, params.negative_prompt),
        ),
        init=image_latents if strength < 1.0 else None,
        strength=strength,
        extra=extra,
        noise=noise,
        step_hook=step_hook,
        scheduler=scheduler,
    )
    return pipeline.to_numpy(pipeline.decode_latents(model, latents, context))


def _resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    channels = [np.asarray(Image.fromarray(array[..., c], "F").resize(size, resample)) for c in range(array.shape[2])]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32)
