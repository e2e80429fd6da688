"""The ``superres`` task: diffusion super-resolution conditioned on the bicubic upsample.

Large images run in overlapping tiles blended with linear ramps, so memory is bounded by the tile
size; every tile takes its noise from one image-wide noise field, so overlapping tiles agree.
Alpha is upscaled separately (bicubic) and re-attached; 16-bit input is processed in float.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from difftool.core.devices import is_out_of_memory
from difftool.core.errors import BackendUnavailableError, DifftoolError, ModelError, ParameterError
from difftool.core.images import LoadedImage, check_pixels, to_pil
from difftool.core.params import Params
from difftool.core.task import ExportShapes, Param, RunContext, Task, TaskRequest, TaskResult
from difftool.plugins.builtin import pixel_model, upscalers
from difftool.plugins.hookspecs import hookimpl

#: The embedded superres models by the names ``--model`` takes: the clean one and the real-world one (trained on
#: blur, noise and JPEG, see difftool/models/superres-real/README.md).
EMBEDDED = {"difftool": "superres", "difftool-real": "superres-real"}


def choose_embedded(image: LoadedImage, model: str | None, scale: int) -> tuple[Path | None, str]:
    """Which embedded model upscales ``image`` by ``scale`` and why: ``--model difftool``/``difftool-real`` force
    one; without ``--model``, an input that went through JPEG (:func:`jpeg_evidence`) gets the real-world model
    (when it has that scale), others the clean one. ``(None, "")`` when ``model`` names some other model, or
    when this install has no real-world model (the embedded one runs, as before)."""
    from difftool.plugins.builtin.jpeg_evidence import jpeg_evidence

    if model is not None and model not in EMBEDDED:
        return None, ""
    if model is not None:
        folder = pixel_model.embedded_model_path(EMBEDDED[model])
        if folder is None:
            raise ModelError(f"this install has no {model} model", "pass --model difftool or a model folder")
        return folder, f"{model} (asked for)"
    real = pixel_model.embedded_model_path(EMBEDDED["difftool-real"])
    if real is None:
        return None, ""
    clean = pixel_model.embedded_model_path(EMBEDDED["difftool"])
    evidence = jpeg_evidence(image)
    if not evidence:
        return clean, "difftool (input shows no JPEG compression)"
    if scale not in json.loads((real / pixel_model.META_FILE).read_text()).get("scales", ()):
        return clean, f"difftool ({evidence}, but the real-world model has no {scale}x variant)"
    return real, f"difftool-real ({evidence})"


class SuperResolution(Task):
    name = "superres"
    summary = "Upscale an image 2x or 4x with a diffusion model, or by a community upscaler (--model X.pth)"
    uses_model = True
    exports = True
    model_families = ("difftool-superres", upscalers.FAMILY)
    model_keywords = tuple(EMBEDDED)
    params = (
        Param(
            "scale",
            "choice",
            default=None,
            choices=(1, 2, 3, 4, 8),
            help="upscaling factor (default: 4, or a community model's own scale)",
        ),  # an int (2, not "2") from the declaration on; None: the model's own scale
        Param("steps", "int", default=None, min=1, max=1000, help="denoising steps (default: the model's)"),
        Param("scheduler", "choice", default=None, choices_from="schedulers", help="default: the model's"),
        Param("tile", "int", default=1024, min=32, max=8192, help="largest tile, in output pixels (bounds memory)"),
        Param("overlap", "int", default=64, min=8, max=1024, help="tile overlap in output pixels"),
        Param("keep_mode", "bool", default=False, help="write grayscale input as grayscale (16-bit stays 16-bit)"),
    )

    availability = pixel_model.availability

    def check(self, params: Params) -> None:
        """Tiles must overlap by less than their size (checked at preflight, before any model loads)."""
        if params.overlap >= params.tile:
            raise ParameterError(
                f"--overlap {params.overlap} must be smaller than --tile {params.tile}", "lower --overlap"
            )

    def output_size(self, params: Params, inputs: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
        """The input times ``scale`` (without one: times 8, the largest a model may have)."""
        scale = max(self.param("scale").choices) if params.scale is None else params.scale
        return (inputs[0][0] * scale, inputs[0][1] * scale) if inputs else None

    def export_target(self, model: str | None) -> Any:
        return pixel_model.export_target(self.name, model)

    def export_shapes(self, request: TaskRequest) -> ExportShapes:
        """The U-Net runs on output-resolution tiles of at most ``--tile`` pixels, one at a time.

        The smallest is 1 (the engine's floor is the U-Net's multiple): edge tiles and small images fit, and
        the declaration does not depend on the image, so one engine serves a whole folder.
        """
        tile = request.params.tile
        return ExportShapes(batch=(1, 1, 1), size=(1, tile, tile))

    def run(self, request: TaskRequest, context: RunContext) -> TaskResult:
        image: LoadedImage = request.inputs["image"]
        params = request.params
        named = context.model if context.model not in EMBEDDED else None
        community = upscalers.upscaler_path(named, context.registry)
        if community is not None:
            return self.run_upscaler(community, image, params, context)
        requested: int | None = params.scale
        chosen, reason = choose_embedded(image, context.model, DEFAULT_SCALE if requested is None else requested)
        if chosen is not None:  # without --scale, each model's own default variant (both: 4x)
            model = pixel_model.load_pixel_model(chosen, self.name, requested)
            context.cancel.raise_if_cancelled()
        else:
            model = pixel_model.model_for(self.name, context, variant=requested)  # no --scale: the default variant
        if requested is not None:
            scale = requested
        else:
            offered = model.meta.get("scales") or [DEFAULT_SCALE]
            scale = DEFAULT_SCALE if DEFAULT_SCALE in offered else int(offered[0])
        check_pixels(image.width * scale, image.height * scale, what=f"the {scale}x output")
        scales = model.meta.get("scales", [scale])
        if scale not in scales:
            raise ModelError(
                f"model {model.name} upscales by {', '.join(map(str, scales))}, not {scale}",
                f"pass --scale {scales[0]} or another model",
            )
        rgb, tile = with_tile_retry(
            lambda t: upscale_rgb(model, image.rgb, scale, params.replace(tile=t), context), params.tile, context
        )
        result = finish(image, rgb, scale, params)
        record = {
            "task": self.name,
            "scale": scale,
            "steps": params.steps or model.meta.get("steps"),  # None: the model's
            "scheduler": params.scheduler or model.meta.get("scheduler"),
            "size": f"{result.width}x{result.height}",
            **pixel_model.model_record(model),
        }
        if tile != params.tile:
            record["tile_used"] = tile
        if reason:
            record["model_choice"] = reason
            context.logger.info("model: %s", reason)
        return TaskResult([result], record)

    def run_upscaler(self, path: Path, image: LoadedImage, params: Params, context: RunContext) -> TaskResult:
        """A community upscaler (spandrel): one forward pass per tile, at the model's own scale."""
        if context.backend_name not in ("torch", "onnx", "tensorrt"):
            raise BackendUnavailableError(
                f"community upscalers run on the torch, onnx and tensorrt backends, not {context.backend_name!r}",
                "pass --backend torch, onnx or tensorrt",
            )
        upscaler = upscalers.load_upscaler(path)
        context.cancel.raise_if_cancelled()
        scale = upscaler.scale
        if params.scale is not None and params.scale != scale:
            raise ParameterError(
                f"{upscaler.name} is a {scale}x {upscaler.architecture} model; --scale {params.scale} differs",
                f"drop --scale or pass --scale {scale}",
            )
        check_pixels(image.width * scale, image.height * scale, what=f"the {scale}x output")
        precision = []

        def attempt(tile: int) -> np.ndarray:
            rgb, used = upscalers.upscale(upscaler, image.rgb, params.replace(tile=tile), context)
            precision.append(used)
            return rgb

        rgb, tile = with_tile_retry(attempt, params.tile, context)
        result = finish(image, rgb, scale, params)
        record = {
            "task": self.name,
            "scale": scale,
            "size": f"{result.width}x{result.height}",
            "precision": precision[-1],
            **upscalers.model_record(upscaler),
        }
        if tile != params.tile:
            record["tile_used"] = tile
        return TaskResult([result], record)


#: The embedded model's scale when --scale is not given.
DEFAULT_SCALE = 4


def finish(image: LoadedImage, rgb: np.ndarray, scale: int, params: Params) -> Image.Image:
    """The upscaled RGB with the source's alpha (upscaled on its own) and, with --keep-mode, its mode."""
    alpha = upscale_alpha(image.alpha, scale)
    keep = params.keep_mode and image.grayscale
    if keep and image.bits == 16 and alpha is None:
        gray = np.clip(rgb.mean(axis=2) * 65535.0 + 0.5, 0, 65535).astype(np.uint16)
        return Image.fromarray(gray)
    return to_pil(rgb, alpha, grayscale=keep)


MIN_TILE = 64
T = TypeVar("T")


def with_tile_retry(attempt: Callable[[int], T], tile: int, context: RunContext) -> tuple[T, int]:
    """``attempt(tile)``, halving the tile after an out-of-memory error until it fits or is too small."""
    import gc

    import torch

    while True:
        try:
            return attempt(tile), tile
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if tile // 2 < MIN_TILE:
                raise DifftoolError(
                    f"out of memory even with {tile} px tiles",
                    "close other programs, use --device cpu, or a smaller image",
                ) from error
            context.logger.warning("out of memory with %d px tiles; retrying with %d px", tile, tile // 2)
            tile //= 2


class _TileProgress:
    """Reports steps across all tiles as one count."""

    def __init__(self, context: RunContext, tiles: int, steps: int) -> None:
        self.context, self.total, self.done = context, tiles * steps, 0

    def __call__(self, step: int, total: int, preview: Any) -> None:
        self.context.report(self.done + step, self.total, preview)
        if step == total:
            self.done += total


def upscale_rgb(
    model: pixel_model.PixelModel, rgb: np.ndarray, scale: int, params: Params, context: RunContext
) -> np.ndarray:
    """Upscale float RGB (H x W x 3, [0, 1]) by ``scale`` with ``model``, tile by tile."""
    import torch

    from difftool.core.sampler import make_noise
    from difftool.core.tiling import blend_weights, tile_spans
    from difftool.plugins.builtin.pixel_model import upsample

    low = pixel_model.to_tensor(rgb)
    height, width = rgb.shape[:2]
    out_h, out_w = height * scale, width * scale
    lr_tile = max(model.multiple, params.tile // scale)
    lr_overlap = max(1, min(params.overlap // scale, lr_tile // 2))  # smaller tiles after an OOM
    spans_y = tile_spans(height, lr_tile, lr_overlap)
    spans_x = tile_spans(width, lr_tile, lr_overlap)
    steps = params.steps or int(model.meta.get("steps", 4))  # None: the model's
    denoiser = pixel_model.make_denoiser(model, context)
    noise = make_noise((1, 3, out_h, out_w), context, torch.device("cpu"), torch.float32)
    extra = {}
    if getattr(model.unet.config, "num_class_embeds", None):
        extra["class_labels"] = torch.tensor([model.meta.get("scales", [scale]).index(scale)])
    tile_context = copy.copy(context)
    tile_context.progress = _TileProgress(context, len(spans_y) * len(spans_x), steps)
    total = torch.zeros(3, out_h, out_w)
    weight = torch.zeros(out_h, out_w)
    overlap = lr_overlap * scale
    for y0, y1 in spans_y:
        for x0, x1 in spans_x:
            up = upsample(low[..., y0:y1, x0:x1], scale)
            ys, xs = (y0 * scale, y1 * scale), (x0 * scale, x1 * scale)
            out = pixel_model.denoise(
                model,
                denoiser,
                cond=up,
                steps=steps,
                scheduler=params.scheduler,
                context=tile_context,
                base=up,
                noise=noise[..., ys[0] : ys[1], xs[0] : xs[1]],
                extra=extra,
            )
            w = blend_weights(ys, xs, (out_h, out_w), overlap)
            total[:, ys[0] : ys[1], xs[0] : xs[1]] += out[0] * w
            weight[ys[0] : ys[1], xs[0] : xs[1]] += w
            del out, up
    total /= weight
    return ((total.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def upscale_alpha(alpha: np.ndarray | None, scale: int) -> np.ndarray | None:
    """Alpha is upscaled on its own with bicubic resampling (no diffusion), then re-attached."""
    if alpha is None:
        return None
    mask = Image.fromarray(alpha.astype(np.float32), "F")
    big = mask.resize((mask.width * scale, mask.height * scale), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(big), 0.0, 1.0)


@hookimpl
def register_tasks(register: Callable[[type[Task]], None]) -> None:
    register(SuperResolution)
