"""``upscale-sd`` with an SD 3.5 or Flux model: the same upscale and overlapping tiles as for Stable Diffusion
(:func:`~difftool.plugins.builtin.sd.upscale_sd.refine_tiles`), each tile repainted by this family's img2img
(the ``style`` path: its VAE sample, then the noise, drawn from the run's generator)."""

from __future__ import annotations

from typing import Any

import numpy as np

from difftool.core.errors import ParameterError
from difftool.core.task import RunContext, TaskRequest, TaskResult


def upscale_sd(request: TaskRequest, context: RunContext, model: Any) -> TaskResult:
    from difftool.core.images import check_pixels, to_pil
    from difftool.plugins.builtin.flow import pipeline
    from difftool.plugins.builtin.flow.samplers import shift_record
    from difftool.plugins.builtin.flow.scheduler import run_scheduler
    from difftool.plugins.builtin.sd.models import split_loras
    from difftool.plugins.builtin.sd.pipeline import to_numpy
    from difftool.plugins.builtin.sd.upscale_sd import UpscaleSD, refine_tiles, scaled_alpha, tile_starts

    params = request.params
    if model.family.inpainting:
        raise ParameterError(f"{model.name} is an inpainting model", "pass a base (txt2img) model to upscale-sd")
    image = request.inputs["image"]
    width, height = (max(8, round(v * params.scale / 8) * 8) for v in image.size)  # as for SD models
    check_pixels(width, height, what=f"the {params.scale}x output")
    upscaled = UpscaleSD.upscale(image.rgb, (width, height), params.upscaler, context)
    prompt = split_loras(str(params.prompt or ""))[0]
    text = pipeline.encode(model, prompt, params.negative_prompt or "", float(params.guidance_scale), context,
                           params.true_cfg)  # fmt: skip
    scheduler = run_scheduler(params.scheduler, model.family.label)
    step = model.vae_scale * 2

    def refine(crop: np.ndarray) -> np.ndarray:
        """One tile through img2img, edge-padded to the model's multiples (16 px) and cropped back."""
        h, w = crop.shape[:2]
        padded = np.pad(crop, ((0, -h % step), (0, -w % step), (0, 0)), mode="edge")
        init = pipeline.encode_image(model, padded, context)
        latents = pipeline.sample_latents(
            model, text, context, size=(padded.shape[1], padded.shape[0]), steps=int(params.steps),
            scheduler=scheduler, init=init, strength=float(params.strength), shift=params.shift,
        )  # fmt: skip
        return to_numpy(pipeline.decode(model, latents, context))[:h, :w]

    result = refine_tiles(upscaled, params.tile, params.overlap, refine, context)
    tiles = len(tile_starts(width, params.tile, params.overlap)) * len(tile_starts(height, params.tile, params.overlap))
    record = {"task": "upscale-sd", "size": f"{width}x{height}", "tiles": tiles, "scheduler": scheduler}
    record |= {
        **model.record(),
        **shift_record(model, params.shift, (min(params.tile, width), min(params.tile, height))),
    }
    if model.family.guidance_embeds:
        record["distilled_guidance"] = float(params.guidance_scale)
    return TaskResult([to_pil(result, scaled_alpha(image, (width, height)))], record)
