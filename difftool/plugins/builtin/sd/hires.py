"""A second pass at high resolution (A1111's "hires fix") for ``generate``.

The first pass samples at the requested size; its latents are upscaled, either in latent space
(bilinear, A1111's default "Latent" upscaler) or by decoding, running a superres model (the embedded
one or a community upscaler, through the superres task itself) and encoding again; then img2img at
the target size with ``--hires-strength`` finishes it. The same generator runs on through both
passes, so the result equals diffusers' text-to-image pipeline (``output_type="latent"``) followed by
its img2img pipeline on the upscaled latents, with one generator.
"""

from __future__ import annotations

from typing import Any

from difftool.core.errors import ParameterError
from difftool.core.params import Params
from difftool.core.task import Param, RunContext
from difftool.plugins.builtin.upscalers import SUPERRES_FAMILIES

HIRES_PARAMS = (
    Param("hires", "float", default=None, min=1.0, max=4.0, help="second pass at this scale (A1111's hires fix)"),
    Param(
        "hires_upscaler",
        "model",
        default=None,
        families=SUPERRES_FAMILIES,
        keywords=("latent", "embedded"),
        help="latent (default: bilinear in latent space), or a superres model: embedded, a listed name or a file",
    ),
    Param("hires_steps", "int", default=None, min=1, max=500, help="steps of the second pass (default: --steps)"),
    Param(
        "hires_strength", "float", default=None, min=0.01, max=1.0, help="denoising of the second pass (default 0.7)"
    ),
)

#: What an unset ``--hires-upscaler`` and ``--hires-strength`` mean once ``--hires`` asks for a second pass. They
#: are applied here rather than declared: a declared default would be recorded (and written into the PNG's
#: parameters) by every run, hires or not.
DEFAULT_UPSCALER, DEFAULT_STRENGTH = "latent", 0.7  # A1111's defaults for the hires pass


def wanted(params: Params) -> bool:
    """Whether the request asks for a second pass (``--hires`` above 1)."""
    return params.hires is not None and params.hires > 1.0


def upscaler_name(params: Params) -> str:
    """``--hires-upscaler``, or :data:`DEFAULT_UPSCALER` when unset."""
    return params.hires_upscaler or DEFAULT_UPSCALER


def strength(params: Params) -> float:
    """``--hires-strength``, or :data:`DEFAULT_STRENGTH` when unset."""
    return DEFAULT_STRENGTH if params.hires_strength is None else params.hires_strength


def target_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The second pass's size: ``size`` x ``scale``, rounded down to multiples of 8 (as A1111 does)."""
    return tuple(max(8, int(v * scale) // 8 * 8) for v in size)  # type: ignore[return-value]


def upscale_latents(model: Any, latents: Any, target: tuple[int, int], params: Params, context: RunContext) -> Any:
    """The first pass's latents at ``target`` (width, height) pixels, ready for img2img."""
    import torch

    from difftool.plugins.builtin.sd import pipeline

    width, height = target
    upscaler = upscaler_name(params)
    if upscaler.lower() == "latent":
        size = (height // model.vae_scale, width // model.vae_scale)
        return torch.nn.functional.interpolate(latents, size=size, mode="bilinear", antialias=False)
    image = pipeline.to_numpy(pipeline.decode_latents(model, latents, context))
    upscaled = superres(image, target, None if upscaler == "embedded" else upscaler, context)
    return pipeline.encode_image(model, pipeline.to_tensor(upscaled), context)


def superres(rgb: Any, target: tuple[int, int], model: str | None, context: RunContext) -> Any:
    """``rgb`` (float HxWx3) upscaled by the superres task with ``model``, then resized to ``target``."""
    import numpy as np
    from PIL import Image

    from difftool.core.images import open_image, to_pil

    height, width = rgb.shape[:2]
    wanted = max(target[0] / width, target[1] / height)
    params = {} if model is not None else {"scale": 2 if wanted <= 2 else 4}  # the embedded model's variants
    if context.registry.tasks.get("superres") is None:
        raise ParameterError("--hires-upscaler needs the superres task", "use --hires-upscaler latent")
    result = context.run_task("superres", [open_image(to_pil(rgb))], model=model, **params)
    upscaled = result.image.convert("RGB")
    if upscaled.size != target:  # a 4x model for a 1.5x pass: Lanczos down to the target
        upscaled = upscaled.resize(target, Image.Resampling.LANCZOS)
    return np.asarray(upscaled, dtype=np.float32) / 255.0


def record(params: Params, target: tuple[int, int]) -> dict[str, Any]:
    """The final size and the hires settings in effect (A1111: ``Hires upscaler``, ``Denoising strength``)."""
    return {
        "size": f"{target[0]}x{target[1]}",
        "hires_upscaler": upscaler_name(params),
        "hires_strength": strength(params),
    }
