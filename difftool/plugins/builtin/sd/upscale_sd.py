"""``upscale-sd``: upscale with a superres model, then refine tile by tile with Stable Diffusion img2img.

A1111's "SD upscale" script and the Ultimate SD Upscale extension do this: a large output is repainted
in model-sized tiles, each guided by the prompt, so a 4096 px result runs in the memory of one tile
(its VAE encode, U-Net and VAE decode), plus the output itself. Tiles overlap and are blended with
linear ramps across the overlap, so no seam shows where two tiles meet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from difftool.core.errors import ParameterError
from difftool.core.images import LoadedImage, check_pixels, to_pil
from difftool.core.params import Params
from difftool.core.task import ExportShapes, Param, RunContext, Task, TaskRequest, TaskResult
from difftool.plugins.builtin.sd import hires, ip_adapter, pipeline
from difftool.plugins.builtin.sd.families import BASE_FAMILIES
from difftool.plugins.builtin.sd.family_params import FLOW_PARAMS, refuse_flow_params
from difftool.plugins.builtin.sd.models import LOAD_PARAMS, delegated_family, sd_model_for
from difftool.plugins.builtin.sd.prompt_chunks import check_prompt_length, prompt_param
from difftool.plugins.builtin.sd.tasks import PROMPT_PARAMS, encode_text, latent_shapes, prompt_tokens, run_sd
from difftool.plugins.builtin.upscalers import SUPERRES_FAMILIES
from difftool.plugins.hookspecs import hookimpl


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of ``tile`` start along ``length``, overlapping by at least ``overlap``; the last one
    ends at ``length`` (a side that fits in one tile is one tile)."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def ramp(length: int, overlap: int, before: bool, after: bool) -> np.ndarray:
    """A tile's blend weight along one axis: rising across ``overlap`` after a neighbour, falling before one."""
    weight = np.ones(length, np.float32)
    edge = np.linspace(0, 1, overlap + 2, dtype=np.float32)[1:-1]  # never exactly 0: every pixel is covered
    if before:
        weight[:overlap] = np.minimum(weight[:overlap], edge)
    if after:
        weight[-overlap:] = np.minimum(weight[-overlap:], edge[::-1])
    return weight


def refine_tiles(
    upscaled: np.ndarray, tile: int, overlap: int, refine: Callable[[np.ndarray], np.ndarray], context: RunContext
) -> np.ndarray:
    """``upscaled`` (H x W x 3 floats) repainted tile by tile by ``refine``, tiles blended across ``overlap``."""
    height, width = upscaled.shape[:2]
    total = np.zeros((height, width, 3), np.float32)
    weights = np.zeros((height, width, 1), np.float32)
    xs, ys = tile_starts(width, tile, overlap), tile_starts(height, tile, overlap)
    th, tw = min(tile, height), min(tile, width)  # every tile has this size
    for row, top in enumerate(ys):
        for col, left in enumerate(xs):
            context.cancel.raise_if_cancelled()
            refined = refine(upscaled[top : top + th, left : left + tw])
            wy = ramp(th, overlap, row > 0, row < len(ys) - 1)
            wx = ramp(tw, overlap, col > 0, col < len(xs) - 1)
            window = (wy[:, None] * wx[None, :])[..., None]
            total[top : top + th, left : left + tw] += refined * window
            weights[top : top + th, left : left + tw] += window
    total /= weights  # in place: no second full-size float array
    return total


class UpscaleSD(Task):
    name = "upscale-sd"
    summary = "Upscale, then repaint detail tile by tile with Stable Diffusion (A1111's SD upscale)"
    uses_model = True
    model_families = BASE_FAMILIES
    inputs = (Task.inputs[0],)
    params = (
        prompt_param("prompt", default="", help="what the image shows (guides the detail)"),
        Param("scale", "float", default=2.0, min=1.0, max=8.0, help="upscaling factor"),
        Param(
            "upscaler",
            "model",
            default="embedded",
            families=SUPERRES_FAMILIES,
            keywords=("embedded", "lanczos"),
            help="embedded (difftool's superres model), lanczos, or a superres model: a listed name or a file",
        ),
        Param("strength", "float", default=0.3, min=0.01, max=1.0, help="how much each tile is repainted"),
        Param("tile", "int", default=512, min=16, max=2048, help="tile side in output pixels (multiple of 8)"),
        Param("overlap", "int", default=64, min=8, max=512, help="overlap between tiles, in output pixels"),
        *PROMPT_PARAMS,
        *ip_adapter.REFERENCE_PARAMS,
        *FLOW_PARAMS,  # SD3 / Flux only
        *LOAD_PARAMS,
    )

    def availability(self, model: str | None) -> str | None:
        return None if model else "it needs a Stable Diffusion model; pass --model PATH"

    def check(self, params: Params) -> None:
        """The prompts' length, and tiles that overlap by less than their size (before any model loads)."""
        check_prompt_length(params)
        ip_adapter.check(params)
        if params.tile % 8 or params.overlap >= params.tile:
            raise ParameterError(
                f"--tile {params.tile} must be a multiple of 8 and larger than --overlap {params.overlap}",
                "pass e.g. --tile 512 --overlap 64",
            )

    def check_backend(self, params: Mapping[str, Any], backend: Any) -> None:
        ip_adapter.check_backend(params, backend)

    def output_size(self, params: Params, inputs: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
        scale = params.scale
        return tuple(max(8, round(v * scale / 8) * 8) for v in inputs[0]) if inputs else None  # type: ignore[return-value]

    def export_shapes(self, request: TaskRequest) -> ExportShapes:
        """Every tile has the same size (a small image: one smaller tile)."""
        params = request.params
        tokens = prompt_tokens(params.prompt, params.negative_prompt)
        return latent_shapes((params.tile, params.tile), params.guidance_scale, exact=False, tokens=tokens)

    @ip_adapter.with_reference  # the reference encoded once, its image tokens in every tile
    def run(self, request: TaskRequest, context: RunContext) -> TaskResult:
        family = delegated_family(context, self.name)
        if family is not None:  # another architecture's plugin (SD3, Flux) refines the tiles
            return family.run(self.name, request, context)
        refuse_flow_params(request.params)
        params = request.params
        image: LoadedImage = request.inputs["image"]
        tile, overlap = params.tile, params.overlap  # checked against each other at preflight (check)
        width, height = (max(8, round(v * params.scale / 8) * 8) for v in image.size)
        check_pixels(width, height, what=f"the {params.scale}x output")
        model = sd_model_for(context, params)
        if model.family.inpainting:
            raise ParameterError(f"{model.name} is an inpainting model", "pass a base (txt2img) model to upscale-sd")
        upscaled = self.upscale(image.rgb, (width, height), params.upscaler, context)
        th, tw = min(params.tile, height), min(params.tile, width)  # every tile has this size
        text = encode_text(model, context, params, params.prompt, params.negative_prompt, (tw, th))  # once for all
        result = refine_tiles(upscaled, tile, overlap, lambda crop: self._refine(model, crop, params, context, text),
                              context)  # fmt: skip
        xs, ys = tile_starts(width, tile, overlap), tile_starts(height, tile, overlap)
        record = {
            "task": self.name,
            "size": f"{width}x{height}",
            "tiles": len(xs) * len(ys),
            **model.record(),
        }
        return TaskResult([to_pil(result, scaled_alpha(image, (width, height)))], record)

    @staticmethod
    def upscale(rgb: np.ndarray, size: tuple[int, int], upscaler: str, context: RunContext) -> np.ndarray:
        if upscaler == "lanczos":
            channels = [Image.fromarray(rgb[..., c], "F").resize(size, Image.Resampling.LANCZOS) for c in range(3)]
            return np.clip(np.stack([np.asarray(c) for c in channels], axis=-1), 0.0, 1.0).astype(np.float32)
        return hires.superres(rgb, size, None if upscaler == "embedded" else upscaler, context)

    @staticmethod
    def _refine(model: Any, crop: np.ndarray, params: Params, context: RunContext, text: Any) -> np.ndarray:
        """One tile through img2img at its own size (its VAE encode and decode are tile-sized too)."""
        size = (crop.shape[1], crop.shape[0])
        init = pipeline.encode_image(model, pipeline.to_tensor(crop), context)
        latents = run_sd(
            model,
            context,
            params,
            prompt=params.prompt,
            negative=params.negative_prompt,
            size=size,
            init=init,
            strength=params.strength,
            text=text,
        )
        return pipeline.to_numpy(pipeline.decode_latents(model, latents, context))


def scaled_alpha(image: LoadedImage, size: tuple[int, int]) -> np.ndarray | None:
    if image.alpha is None:
        return None
    alpha = Image.fromarray(image.alpha.astype(np.float32), "F").resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(alpha), 0.0, 1.0)


@hookimpl
def register_tasks(register: Callable[[type[Task]], None]) -> None:
    register(UpscaleSD)
