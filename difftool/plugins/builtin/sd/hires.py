"""A second pass at high resolution (A1111's "hires fix") for ``generate``.

The first pass samples at the requested size; its latents are upscaled, either in latent space
(bilinear, A1111's default "Latent" upscaler) or by decoding, running a superres model (the embedded
one or a community upscaler, through the superres task itself) and encoding again; then img2img at
the target size with ``--hires-strength`` finishes it. The same generator runs on through both
passes, so the result equals diffusers' text-to-image pipeline (``output_type="latent"``) followed by
its img2img pipeline on the upscaled latents, with one generator.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from difftool.core.errors import ParameterError
from difftool.core.task import Param, RunContext, TaskRequest

HIRES_PARAMS = (
    Param("hires", "float", default=None, min=1.0, max=4.0, help="second pass at this scale (A1111's hires fix)"),
    Param(
        "hires_upscaler",
        "string",
        default=None,
        help="latent (default: bilinear in latent space), or a superres model: embedded, a listed name or a file",
    ),
    Param("hires_steps", "int", default=None, min=1, max=500, help="steps of the second pass (default: --steps)"),
    Param(
        "hires_strength", "float", default=None, min=0.01, max=1.0, help="denoising of the second pass (default 0.7)"
    ),
)


def target_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The second pass's size: ``size`` x ``scale``, rounded down to multiples of 8 (as A1111 does)."""
    return tuple(max(8, int(v * scale) // 8 * 8) for v in size)  # type: ignore[return-value]


def upscale_latents(
    model: Any, latents: Any, target: tuple[int, int], params: dict[str, Any], context: RunContext
) -> Any:
    """The first pass's latents at ``target`` (width, height) pixels, ready for img2img."""
    import torch

    from difftool.plugins.builtin.sd import pipeline

    width, height = target
    upscaler = str(params.get("hires_upscaler") or "latent")
    if upscaler.lower() == "latent":
        size = (height // model.vae_scale, width // model.vae_scale)
        return torch.nn.functional.interpolate(latents, size=size, mode="bilinear", antialias=False)
    image = pipeline.to_numpy(pipeline.decode_latents(model, latents, context))
    upscaled = superres(image, target, None if upscaler.lower() == "embedded" else upscaler, context)
    return pipeline.encode_image(model, pipeline.to_tensor(upscaled), context)


def superres(rgb: Any, target: tuple[int, int], model: str | None, context: RunContext) -> Any:
    """``rgb`` (float HxWx3) upscaled by the superres task with ``model``, then resized to ``target``."""
    import numpy as np
    from PIL import Image

    from difftool.core.images import open_image, to_pil
    from difftool.plugins.builtin.superres import SuperResolution

    task = SuperResolution()
    params = {p.name: p.default for p in task.params}
    height, width = rgb.shape[:2]
    wanted = max(target[0] / width, target[1] / height)
    if model is None:
        params["scale"] = 2 if wanted <= 2 else 4  # the embedded model's variants
    run = dataclasses.replace(context, model=model, denoisers=[], notes={}, export_shapes=None)
    if context.registry.tasks.get("superres") is None:
        raise ParameterError("--hires-upscaler needs the superres task", "use --hires-upscaler latent")
    request = TaskRequest({"image": open_image(to_pil(rgb))}, params)
    upscaled = task.run(request, run).images[0].convert("RGB")
    if upscaled.size != target:  # a 4x model for a 1.5x pass: Lanczos down to the target
        upscaled = upscaled.resize(target, Image.Resampling.LANCZOS)
    return np.asarray(upscaled, dtype=np.float32) / 255.0


DEFAULT_STRENGTH = 0.7  # A1111's default denoising strength for the hires pass


def record(params: dict[str, Any], target: tuple[int, int]) -> dict[str, Any]:
    """The final size and the hires settings in effect (A1111: ``Hires upscaler``, ``Denoising strength``)."""
    return {
        "size": f"{target[0]}x{target[1]}",
        "hires_upscaler": params.get("hires_upscaler") or "latent",
        "hires_strength": params.get("hires_strength") or DEFAULT_STRENGTH,
    }
