"""The ``inpaint`` task with difftool's pixel-space inpainting model.

Mask semantics: non-zero (white) pixels are repainted, zero (black) pixels are kept bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from difftool.core.errors import ParameterError
from difftool.core.images import LoadedImage, to_pil, to_uint8
from difftool.core.task import Param, RunContext, Task, TaskRequest, TaskResult
from difftool.plugins.builtin import pixel_model
from difftool.plugins.hookspecs import hookimpl


class Inpaint(Task):
    name = "inpaint"
    summary = "Repaint the white area of a mask"
    uses_model = True
    params = (
        Param("mask", "mask", required=True, help="mask image: white (non-zero) = repaint, black = keep"),
        Param("resize_mask", "bool", default=False, help="resize a mask of another size to the image"),
        Param("steps", "int", default=None, min=1, max=1000, help="denoising steps (default: the model's)"),
        Param("scheduler", "choice", default=None, choices_from="schedulers", help="default: the model's"),
    )

    def availability(self, model: str | None) -> str | None:
        if model is None and pixel_model.embedded_model_path(self.name) is None:
            return f"no embedded {self.name} model in this install; pass --model PATH"
        return None

    def run(self, request: TaskRequest, context: RunContext) -> TaskResult:
        import torch

        image: LoadedImage = request.inputs["image"]
        keep = 1.0 - mask_array(request.params["mask"], image.size, bool(request.params.get("resize_mask")))
        find = context.registry.find_models if context.registry is not None else None
        model = pixel_model.load_pixel_model(pixel_model.resolve_model(self.name, context.model, find), self.name)
        x = pixel_model.to_tensor(image.rgb)
        known = torch.from_numpy(keep)[None, None]
        cond = torch.cat([x * known, 1 - known], dim=1)
        out = pixel_model.to_numpy(
            pixel_model.denoise(
                model,
                cond=cond,
                steps=request.params.get("steps"),
                scheduler=request.params.get("scheduler"),
                context=context,
            )
        )
        original = to_uint8(image.rgb)
        painted = to_uint8(out)
        # Composite in 8 bits so kept pixels are exactly the input's.
        result = np.where(keep[..., None] >= 1.0, original, painted)
        rgb = result.astype(np.float32) / 255.0
        record = {
            "task": self.name,
            "steps": request.params.get("steps") or model.meta.get("steps"),
            "scheduler": request.params.get("scheduler") or model.meta.get("scheduler"),
            "size": f"{image.width}x{image.height}",
            **pixel_model.model_record(model),
        }
        return TaskResult([to_pil(rgb, image.alpha)], record)


def mask_array(mask: LoadedImage, size: tuple[int, int], resize: bool) -> np.ndarray:
    """The repaint mask as float H x W in {0, 1}: 1 where the mask image is non-zero."""
    values = mask.rgb.max(axis=2)
    if mask.size != size:
        if not resize:
            raise ParameterError(
                f"the mask is {mask.width}x{mask.height} but the image is {size[0]}x{size[1]}",
                "pass a mask of the image's size or add --resize-mask",
            )
        values = np.asarray(Image.fromarray(values, "F").resize(size, Image.Resampling.NEAREST))
    return (values > 0).astype(np.float32)


@hookimpl
def register_tasks(register: Callable[[type[Task]], None]) -> None:
    register(Inpaint)
