"""``--hires`` for SD3 and Flux ``generate``: A1111's hires fix, as for Stable Diffusion models.

The first pass samples at the requested size; its latents are upscaled in latent space (bilinear, the
default "latent" upscaler) or decoded, upscaled by a superres model and encoded again; img2img at the
target size with ``--hires-strength`` finishes it. The run's generator goes on through both passes, so the
result equals diffusers' ``FluxPipeline`` / ``StableDiffusion3Pipeline`` (``output_type="latent"``)
followed by its img2img pipeline given the upscaled latents, with one generator.
"""

from __future__ import annotations

from typing import Any

from difftool.core.params import Params
from difftool.core.task import RunContext


def target_size(model: Any, size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``size`` x ``scale`` in the model's multiples (16 px: the VAE's 8 x the transformer's 2 x 2 patches)."""
    step = model.vae_scale * 2
    return tuple(max(step, int(v * scale) // step * step) for v in size)  # type: ignore[return-value]


def second_pass(
    model: Any, latents: Any, text: Any, params: Params, context: RunContext, size: tuple[int, int], scheduler: str
) -> tuple[Any, dict[str, Any]]:
    """The first pass's ``latents`` (at ``size``) upscaled and refined: (latents, the record's hires fields)."""
    import torch

    from difftool.plugins.builtin.flow import pipeline
    from difftool.plugins.builtin.sd import hires
    from difftool.plugins.builtin.sd.pipeline import to_numpy

    target = target_size(model, size, float(params.hires))
    upscaler = hires.upscaler_name(params)
    if upscaler.lower() == "latent":
        cells = (target[1] // model.vae_scale, target[0] // model.vae_scale)
        init = torch.nn.functional.interpolate(latents, size=cells, mode="bilinear", antialias=False)
    else:
        image = to_numpy(pipeline.decode(model, latents, context))
        rgb = hires.superres(image, target, None if upscaler == "embedded" else upscaler, context)
        init = pipeline.encode_image(model, rgb, context)
    steps = int(params.hires_steps or params.steps)
    refined = pipeline.sample_latents(model, text, context, size=target, steps=steps, scheduler=scheduler,
                                      init=init, strength=hires.strength(params), shift=params.shift)  # fmt: skip
    return refined, hires.record(params, target)
