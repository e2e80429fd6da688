"""The ``inpaint`` task: difftool's pixel-space inpainting model, or a Stable Diffusion model.

With ``--model`` naming a Stable Diffusion checkpoint (inpainting or ordinary), the SD path in
:mod:`difftool.plugins.builtin.sd.inpaint` runs with ``--prompt``; ``--extend`` outpaints and
``--only-masked`` repaints a crop around the mask at the model's resolution. Otherwise:

``--fill noise`` paints the hole from pure noise: the default of the embedded model, an
:class:`~difftool.plugins.builtin.inpaintnet.InpaintNet` that fills the hole with a pyramid fill
itself and adds what that smooth fill misses, texture included. ``--fill blur`` first fills the hole
from its surroundings (a push-pull pyramid fill: the colours flow in smoothly from the border) and
lets the model refine it from ``--strength`` (img2img, like A1111's "masked content: fill"): the
default of models whose ``difftool.json`` does not name a ``fill``, such as U-Net ones.

Mask semantics: non-zero (white) pixels are repainted, zero (black) pixels are kept. ``--dilate``
grows the mask; ``--feather`` blends the repainted area into the original over that many pixels
outside the mask. Pixels outside the feathered mask are bit-exact copies of the input. Only a crop
around the mask (plus ``--context`` pixels) goes through the model, so large images stay fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from difftool.core.errors import ParameterError
from difftool.core.images import LoadedImage, to_pil, to_uint8
from difftool.core.params import Params
from difftool.core.task import ExportShapes, Param, RunContext, Task, TaskRequest, TaskResult
from difftool.plugins.builtin import pixel_model
from difftool.plugins.builtin.masks import crop_box, dilate, feather, push_pull_fill
from difftool.plugins.builtin.sd import ip_adapter
from difftool.plugins.builtin.sd.control import CONTROL_PARAM
from difftool.plugins.builtin.sd.control import check_backend as check_control_backend
from difftool.plugins.builtin.sd.families import BASE_FAMILIES
from difftool.plugins.builtin.sd.family_params import FLOW_PARAMS, refuse_flow_params
from difftool.plugins.builtin.sd.inpaint import parse_extend, requested_mask
from difftool.plugins.builtin.sd.models import LOAD_PARAMS, delegated_family, is_sd_request
from difftool.plugins.builtin.sd.prompt_chunks import check_prompt_length, prompt_param
from difftool.plugins.builtin.sd.tasks import DEFAULT_SCHEDULER, DEFAULT_STEPS, EMBEDDING_PARAM
from difftool.plugins.hookspecs import hookimpl


class Inpaint(Task):
    name = "inpaint"
    summary = "Repaint the white area of a mask"
    uses_model = True
    exports = True
    model_families = ("difftool-inpaint", *BASE_FAMILIES)  # SD checkpoints inpaint too (an inpainting one best)
    params = (
        Param("mask", "mask", help="mask image: white (non-zero) = repaint, black = keep (or use --extend)"),
        Param("resize_mask", "bool", default=False, help="resize a mask of another size to the image"),
        Param("dilate", "int", default=0, min=0, max=256, help="grow the mask by this many pixels"),
        Param("feather", "int", default=0, min=0, max=256, help="blend over this many pixels outside the mask"),
        Param(
            "context",
            "int",
            default=None,
            min=0,
            max=4096,
            help="pixels of context around the mask (default: the model's; SD models: 64)",
        ),
        Param(
            "fill",
            "choice",
            default=None,
            choices=("blur", "noise"),
            help="blur: refine a smooth fill; noise: paint from noise (default: the model's; SD models: the image)",
        ),
        Param(
            "strength",
            "float",
            default=None,
            min=0.05,
            max=1.0,
            help="how much the model repaints (default: 0.3 for the blur fill, 1.0 with SD models)",
        ),
        Param(
            "texture",
            "float",
            default=None,
            min=0.0,
            max=2.0,
            help="difftool's models: detail copied in from around the hole (0: smooth; default: the model's)",
        ),
        Param("steps", "int", default=None, min=1, max=1000, help="denoising steps (default: the model's; SD: 25)"),
        Param("scheduler", "choice", default=None, choices_from="schedulers", help="default: the model's"),
        # Stable Diffusion models only:
        prompt_param("prompt", default="", help="SD models: what to paint in the mask"),
        prompt_param("negative_prompt", default="", help="SD models: what not to paint"),
        Param("guidance_scale", "float", default=7.0, min=0.0, max=50.0, help="SD models: CFG scale"),
        Param("clip_skip", "int", default=1, min=1, max=12, help="SD models: text encoder layer from the end"),
        Param("only_masked", "bool", default=False, help="SD models: repaint a crop around the mask (+ --context)"),
        Param("extend", "string", default=None, help="outpaint: grow the canvas by LEFT,RIGHT,TOP,BOTTOM pixels"),
        EMBEDDING_PARAM,
        CONTROL_PARAM,
        *ip_adapter.REFERENCE_PARAMS,  # SD models only
        *FLOW_PARAMS,  # SD3 / Flux only
        *LOAD_PARAMS,
    )

    availability = pixel_model.availability

    def check(self, params: Params) -> None:
        check_prompt_length(params)
        ip_adapter.check(params)

    def output_size(self, params: Params, inputs: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
        """The input grown by ``extend`` (outpainting)."""
        if not inputs:
            return None
        left, right, top, bottom = parse_extend(params.extend)
        return inputs[0][0] + left + right, inputs[0][1] + top + bottom

    def check_backend(self, params: Mapping[str, Any], backend: Any) -> None:
        check_control_backend(params, backend)
        ip_adapter.check_backend(params, backend)

    def export_target(self, model: str | None) -> Any:
        return pixel_model.export_target(self.name, model)

    def export_shapes(self, request: TaskRequest) -> ExportShapes:
        """The U-Net sees a crop of the image: any size up to 1024 px, or the next power of two above.

        The range depends on the image only beyond 1024 px, in few steps: one engine for a folder.
        (Stable Diffusion inpainting declares its own latent shapes when it builds its denoiser.)
        """
        side = max(request.inputs["image"].size)
        return ExportShapes(batch=(1, 1, 1), size=(1, 512, max(1024, 1 << (side - 1).bit_length())))

    @ip_adapter.with_reference  # a reference: SD models only, the adapter on the U-Net for the run
    def run(self, request: TaskRequest, context: RunContext) -> TaskResult:
        family = delegated_family(context, self.name)
        if family is not None:  # another architecture's plugin (SD3, Flux) runs this model
            return family.run(self.name, request, context)
        refuse_flow_params(request.params)
        image: LoadedImage = request.inputs["image"]
        params = request.params
        mask, extend = requested_mask(params, image)
        if is_sd_request(context.model, context):
            return self._run_sd(image, mask, extend, params, context)
        if any(extend) or params.control:
            flag = "--extend" if any(extend) else "--control"
            raise ParameterError(f"{flag} needs a Stable Diffusion model", "pass --model with an SD checkpoint")
        mask = dilate(mask, params.dilate)
        weight = feather(mask, params.feather)
        model = pixel_model.model_for(self.name, context)
        record = {  # fill, steps, scheduler: None is the model's own
            "task": self.name,
            "fill": params.fill or model.meta.get("fill", "blur"),
            "texture": texture_amount(model, params),
            "steps": params.steps or model.meta.get("steps"),
            "scheduler": params.scheduler or model.meta.get("scheduler"),
            "size": f"{image.width}x{image.height}",
            **pixel_model.model_record(model),
        }
        original = to_uint8(image.rgb)
        if not weight.any():
            context.logger.warning("the mask is empty: the image is returned unchanged")
            return TaskResult([to_pil(image.rgb, image.alpha)], record)
        context_px = int(model.meta.get("context", 64) if params.context is None else params.context)
        record["context"] = context_px
        y0, y1, x0, x1 = crop_box(weight > 0, context_px, image.size)
        painted = paint(model, image.rgb[y0:y1, x0:x1], weight[y0:y1, x0:x1] > 0, params, context)
        w = weight[y0:y1, x0:x1, None]
        blended = to_uint8(image.rgb[y0:y1, x0:x1] * (1 - w) + painted * w)
        result = original.copy()
        # Pixels with zero weight keep the input's exact bytes.
        result[y0:y1, x0:x1] = np.where(w > 0, blended, original[y0:y1, x0:x1])
        return TaskResult([to_pil(result.astype(np.float32) / 255.0, image.alpha)], record)

    def _run_sd(
        self, image: LoadedImage, mask: np.ndarray, extend: tuple[int, ...], params: Params, context: RunContext
    ) -> TaskResult:
        from difftool.plugins.builtin.sd.inpaint import extend_canvas, sd_inpaint

        rgb, alpha, mask = extend_canvas(image.rgb, image.alpha, mask, extend)
        mask = dilate(mask, params.dilate)
        weight = feather(mask, params.feather)
        height, width = mask.shape
        # Unset steps and scheduler (None: the model's own) are Stable Diffusion's defaults for an SD model.
        sd_params = params.replace(steps=params.steps or DEFAULT_STEPS, scheduler=params.scheduler or DEFAULT_SCHEDULER)
        record = {"task": self.name, "size": f"{width}x{height}", "steps": sd_params.steps}
        record["scheduler"] = sd_params.scheduler
        if not weight.any():
            context.logger.warning("the mask is empty: the image is returned unchanged")
            return TaskResult([to_pil(rgb, alpha)], record)
        painted, model = sd_inpaint(rgb, mask, sd_params, context)
        record.update(model.record())
        original = to_uint8(rgb)
        w = weight[..., None]
        blended = to_uint8(rgb * (1 - w) + painted * w)
        # Pixels with zero weight keep the input's exact bytes (the VAE round trip would blur them).
        result = np.where(w > 0, blended, original)
        return TaskResult([to_pil(result.astype(np.float32) / 255.0, alpha)], record)


def paint(
    model: pixel_model.PixelModel, rgb: np.ndarray, repaint: np.ndarray, params: Params, context: RunContext
) -> np.ndarray:
    """The model's fill of ``repaint`` (bool H x W) in ``rgb`` (float H x W x 3), as float RGB."""
    import math

    import torch

    x = pixel_model.to_tensor(rgb)
    hole = torch.from_numpy(repaint.astype(np.float32))[None, None]
    cond = torch.cat([x * (1 - hole), hole], dim=1)
    steps = params.steps or int(model.meta.get("steps", 2))  # None: the model's
    init, strength = None, 1.0
    if (params.fill or model.meta.get("fill", "blur")) == "blur":  # None: the blur fill's 0.3
        init, strength = push_pull_fill(x, 1 - hole), 0.3 if params.strength is None else params.strength
        steps = max(steps, math.ceil(1 / strength))  # plan enough steps that at least one runs
    out = pixel_model.denoise(
        model,
        pixel_model.make_denoiser(model, context),
        cond=cond,
        steps=steps,
        scheduler=params.scheduler,
        context=context,
        init=init,
        strength=strength,
    )
    amount = texture_amount(model, params)
    if amount > 0:
        from difftool.plugins.builtin.texture import transfer_texture

        out = transfer_texture(out, 1 - hole, amount=amount).clamp(-1, 1)
    return pixel_model.to_numpy(out)


def texture_amount(model: pixel_model.PixelModel, params: Params) -> float:
    """``--texture``, or the model's own default (``texture`` in its difftool.json; none: 0)."""
    return float(model.meta.get("texture", 0.0) if params.texture is None else params.texture)


@hookimpl
def register_tasks(register: Callable[[type[Task]], None]) -> None:
    register(Inpaint)
