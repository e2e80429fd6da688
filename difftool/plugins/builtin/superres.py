"""The ``superres`` task: diffusion super-resolution conditioned on the bicubic upsample."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from difftool.core.errors import ModelError
from difftool.core.images import LoadedImage, check_pixels, to_pil
from difftool.core.task import Param, RunContext, Task, TaskRequest, TaskResult
from difftool.plugins.builtin import pixel_model
from difftool.plugins.hookspecs import hookimpl


class SuperResolution(Task):
    name = "superres"
    summary = "Upscale an image 2x or 4x with a diffusion model"
    uses_model = True
    params = (
        Param("scale", "choice", default="4", choices=("2", "4"), help="upscaling factor"),
        Param("steps", "int", default=None, min=1, max=1000, help="denoising steps (default: the model's)"),
        Param("scheduler", "choice", default=None, choices_from="schedulers", help="default: the model's"),
        Param("keep_mode", "bool", default=False, help="write grayscale input as grayscale output"),
    )

    def availability(self, model: str | None) -> str | None:
        if model is None and pixel_model.embedded_model_path(self.name) is None:
            return f"no embedded {self.name} model in this install; pass --model PATH"
        return None

    def run(self, request: TaskRequest, context: RunContext) -> TaskResult:
        image: LoadedImage = request.inputs["image"]
        scale = int(request.params["scale"])
        check_pixels(image.width * scale, image.height * scale, what=f"the {scale}x output")
        find = context.registry.find_models if context.registry is not None else None
        model = pixel_model.load_pixel_model(pixel_model.resolve_model(self.name, context.model, find), self.name)
        scales = model.meta.get("scales", [scale])
        if scale not in scales:
            raise ModelError(
                f"model {model.name} upscales by {', '.join(map(str, scales))}, not {scale}",
                f"pass --scale {scales[0]} or another model",
            )
        rgb = upscale_rgb(model, image.rgb, scale, request.params, context)
        alpha = upscale_alpha(image.alpha, scale)
        result = to_pil(rgb, alpha, grayscale=bool(request.params.get("keep_mode")) and image.grayscale)
        record = {
            "task": self.name,
            "scale": scale,
            "steps": request.params.get("steps") or model.meta.get("steps"),
            "scheduler": request.params.get("scheduler") or model.meta.get("scheduler"),
            "size": f"{result.width}x{result.height}",
            **pixel_model.model_record(model),
        }
        return TaskResult([result], record)


def upscale_rgb(
    model: pixel_model.PixelModel, rgb: np.ndarray, scale: int, params: dict, context: RunContext
) -> np.ndarray:
    """Upscale float RGB (H x W x 3, [0, 1]) by ``scale`` with ``model``."""
    import torch.nn.functional as F

    low = pixel_model.to_tensor(rgb)
    up = F.interpolate(low, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)
    out = pixel_model.denoise(
        model, cond=up, steps=params.get("steps"), scheduler=params.get("scheduler"), context=context, base=up
    )
    return pixel_model.to_numpy(out)


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
