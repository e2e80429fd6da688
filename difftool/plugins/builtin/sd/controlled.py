"""ControlNet at sampling time: control images made ready, and a Denoiser that adds the ControlNets'
residuals to the U-Net's conditioning.

:class:`ControlledDenoiser` wraps the U-Net's denoiser: for each call it runs every unit's ControlNet
on the same sample, timestep and text, sums their residuals and passes them on in the conditioning
dict (``down_block_additional_residuals``, ``mid_block_additional_residual``), so the core sampler is
unchanged. It follows diffusers' ``StableDiffusion(XL)ControlNetPipeline`` step for step: the same
per-step weight schedule (``control_guidance_start/end``), guess mode, and control-image resizing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from difftool.core.denoiser import Conditioning, Denoiser
from difftool.core.errors import ParameterError
from difftool.core.models import model_path
from difftool.core.params import Params
from difftool.core.task import RunContext
from difftool.plugins.builtin.sd import control_backend, controlnet
from difftool.plugins.builtin.sd.control import CONTROLNET_FAMILIES, ControlUnit, a1111_text, preprocess


@dataclass
class PreparedControl:
    """A unit ready to run: its ControlNet and its control image as a 1 x 3 x H x W tensor."""

    unit: ControlUnit
    net: controlnet.ControlNet
    image: Any


@dataclass
class ControlSource:
    """What a unit without its own image sees: the task's input (float H x W x 3) and mask (H x W)."""

    rgb: np.ndarray | None = None
    mask: np.ndarray | None = None


def controls_for(
    params: Params, model: Any, context: RunContext, size: tuple[int, int], source: ControlSource | None = None
) -> list[PreparedControl]:
    """The request's ``control`` units ready for sampling at ``size``; recorded in the run's notes."""
    units = params.control
    if not units:
        return []
    loaded = load_units(units, model, context, params.allow_pickle)
    controls = prepare(loaded, size, context, source)
    context.notes.update(record(controls))
    return controls


def load_units(
    units: Sequence[ControlUnit], model: Any, context: RunContext, allow_pickle: bool = False
) -> list[tuple[ControlUnit, controlnet.ControlNet]]:
    """Each unit's ControlNet, loaded and checked against the model's family (before any sampling)."""
    if units and context.backend is not None:
        control_backend.capable(context.backend)  # before any ControlNet loads
    if units:
        for unit in units:
            context.registry.preprocessor(unit.pre)  # an unknown name fails before the models load
    paths = [model_path(unit.model, context.registry, CONTROLNET_FAMILIES, "ControlNet") for unit in units]
    _refuse_flow_controlnets(paths, model.family)
    nets = [controlnet.loaded(path, context, allow_pickle) for path in paths]
    for net in nets:
        controlnet.check_family(net, model.family, model.unet)
    return list(zip(units, nets, strict=True))


def _refuse_flow_controlnets(paths: Sequence[Any], family: Any) -> None:
    """An SD3 / Flux ControlNet beside a Stable Diffusion model: one line naming both."""
    from difftool.plugins.builtin.flow.controlnet import A_LABEL, arch_of  # the flow plugin reads SD's units

    for path in paths:
        arch = arch_of(path)
        if arch is not None:
            raise ParameterError(
                f"ControlNet {path.name} is {A_LABEL[arch]}, the model is {family.label}",
                f"use a ControlNet made for {family.label} (`difftool models` lists each one's family)",
            )


def prepare(
    loaded: Sequence[tuple[ControlUnit, controlnet.ControlNet]],
    size: tuple[int, int],
    context: RunContext,
    source: ControlSource | None = None,
) -> list[PreparedControl]:
    """Preprocess each unit's image and resize it to ``size`` (width, height), as diffusers does."""
    return [PreparedControl(unit, net, control_image(unit, size, context, source)) for unit, net in loaded]


def control_image(unit: ControlUnit, size: tuple[int, int], context: RunContext, source: ControlSource | None) -> Any:
    import torch
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from difftool.core.images import open_image

    source = source or ControlSource()
    if unit.image is not None:
        image = unit.image
        if isinstance(image, np.ndarray) and image.dtype == np.uint8:
            image = Image.fromarray(image)
        rgb = image if isinstance(image, np.ndarray) else open_image(image).rgb  # a float array is [0, 1]
        mask = source.mask if source.mask is not None and source.mask.shape == rgb.shape[:2] else None
    elif source.rgb is not None:
        rgb, mask = source.rgb, source.mask
    else:
        raise ParameterError(f"ControlNet {unit.model} has no control image", f"write --control {unit.model}=IMAGE")
    out = fit(_preprocess(unit, rgb.astype(np.float32), mask, context), size, unit.resize)
    width, height = size
    if out.min() >= 0.0:  # diffusers' own resizing (Lanczos on the 8-bit image) for parity
        pil = Image.fromarray((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
        processor = VaeImageProcessor(do_convert_rgb=True, do_normalize=False)
        return processor.preprocess(pil, height=height, width=width).to(torch.float32)
    # Negative values (the inpaint preprocessor's -1) survive only a resize without 8-bit rounding.
    channels = [np.asarray(Image.fromarray(out[..., c], "F").resize(size, Image.Resampling.NEAREST)) for c in range(3)]
    return torch.from_numpy(np.stack(channels)).float()[None]


def fit(image: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """``image`` (H x W x 3) cut (``crop``) or fitted and padded (``fill``) to the aspect of ``size``
    (width, height), centred, before it is resized; ``just`` leaves it to be stretched. ``fill`` is done
    at the output's size, as A1111's "Resize and Fill": the image is resized to fit inside ``size``,
    then padded to it (0: no edges, no lines; -1 in an inpaint control image: to be made). Padding at
    the image's own resolution would make a canvas of its long side squared (a 1 x 20000 image: 4.8 GB),
    so no intermediate here is larger than the image or the output."""
    height, width = image.shape[:2]
    target_w, target_h = size
    if mode == "just" or width * target_h == height * target_w:
        return image
    wider = width * target_h > height * target_w
    if mode == "crop":
        if wider:
            keep = max(1, round(height * target_w / target_h))
            return image[:, (width - keep) // 2 : (width - keep) // 2 + keep]
        keep = max(1, round(width * target_h / target_w))
        return image[(height - keep) // 2 : (height - keep) // 2 + keep]
    inner_w, inner_h = (
        (target_w, min(target_h, max(1, round(height * target_w / width))))
        if wider
        else (min(target_w, max(1, round(width * target_h / height))), target_h)
    )
    negative = image.min() < 0
    out = np.full((target_h, target_w, image.shape[2]), -1.0 if negative else 0.0, np.float32)
    top, left = (target_h - inner_h) // 2, (target_w - inner_w) // 2
    out[top : top + inner_h, left : left + inner_w] = _resize_float(image, (inner_w, inner_h), negative)
    return out


def _resize_float(image: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """``image`` (H x W x C float) resized to ``size`` (width, height) channel by channel in float (no
    8-bit rounding, so -1 survives); Lanczos as diffusers' resize, nearest where -1 must stay exact."""
    from PIL import Image

    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), "F").resize(size, resample))
        for c in range(image.shape[2])
    ]
    out = np.stack(channels, axis=-1)
    return out if nearest else np.maximum(out, 0.0)  # Lanczos' undershoot would read as "to be made" (-1)


def _preprocess(unit: ControlUnit, rgb: np.ndarray, mask: np.ndarray | None, context: RunContext) -> np.ndarray:
    return preprocess(context.registry, unit, rgb, mask)


def record(controls: Sequence[PreparedControl]) -> dict[str, Any]:
    """The units for the image metadata: difftool's strings and A1111's ``ControlNet N`` texts."""
    if not controls:
        return {}
    return {
        "control": [str(c.unit) for c in controls],
        "controlnet": [a1111_text(c.unit, c.net.name, c.net.sha256) for c in controls],
    }


def runners_for(controls: Sequence[PreparedControl], context: RunContext, shapes: Any = None) -> list[Any]:
    """Each unit's ControlNet as a :class:`~.control_backend.ControlNetRunner` on the run's backend
    (exported and built before sampling on ``onnx`` and ``tensorrt``); ``shapes`` as the U-Net's."""
    return [
        control_backend.controlnet_runner(context, c.net.module, model_id=c.net.sha256, shapes=shapes) for c in controls
    ]


def residual_scales(count: int, weight: float, guess: bool) -> list[Any]:
    """What each of ``count`` residuals (the mid block's last) is multiplied by, as diffusers' ControlNet does:
    the unit's weight, or in guess mode 0.1 ... 1 (log-spaced from the first block to the middle) times it."""
    import torch

    if not guess:
        return [weight] * count
    return list(torch.logspace(-1, 0, count) * weight)


class ControlledDenoiser(Denoiser):
    """``inner`` (the U-Net) with ControlNet residuals added to its conditioning at every call.

    ``runners`` run each unit's ControlNet (:func:`runners_for`: PyTorch, ONNX Runtime or TensorRT, raw
    residuals); the weight schedule, guess mode and scaling are applied here, the same for every backend.
    ``scheduler`` gives the planned timesteps (the schedule's fractions); ``guided``: the sampler batches
    unconditional and conditional halves (guess mode then feeds the ControlNets the second only).
    Create one per sampling run: it counts its calls as the step index, as diffusers' loop does.
    """

    def __init__(
        self, inner: Denoiser, controls: Sequence[PreparedControl], runners: Sequence[Any], scheduler: Any, guided: bool
    ) -> None:
        self.inner, self.controls, self.runners = inner, list(controls), list(runners)
        self.scheduler, self.guided = scheduler, guided
        for name in ("sample_channels", "in_channels", "prediction_type", "dtype", "device", "backend"):
            setattr(self, name, getattr(inner, name))
        self.calls = 0

    def __call__(self, sample: Any, timestep: Any, cond: Conditioning) -> Any:
        import torch

        # A refiner's base runs a share of a longer plan: the fractions are of the whole (diffusers too).
        step, total = self.calls, getattr(self.scheduler, "whole_plan", None) or len(self.scheduler.timesteps)
        self.calls += 1
        down, mid = None, None
        with torch.inference_mode():
            for control, runner in zip(self.controls, self.runners, strict=True):
                unit = control.unit
                # diffusers: keep = 1 - (i / n < start or (i + 1) / n > end)
                if step / total < unit.start or (step + 1) / total > unit.end or unit.weight == 0:
                    continue  # a zero weight adds zero residuals: skipping it changes nothing
                d, m = self._run(control, runner, sample, timestep, cond)
                down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
                mid = m if mid is None else mid + m
        if down is not None:
            cond = {**cond, "down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}
        return self.inner(sample, timestep, cond)

    def _run(
        self, control: PreparedControl, runner: Any, sample: Any, timestep: Any, cond: Conditioning
    ) -> tuple[Any, Any]:
        import torch

        pooled = bool(getattr(control.net.module.config, "global_pool_conditions", False))
        guess = control.unit.guess or pooled
        text, added = cond.get("encoder_hidden_states"), cond.get("added_cond_kwargs")
        halve = guess and self.guided  # guess mode: the ControlNet sees the conditional half only
        if halve:
            sample, text = sample.chunk(2)[1], text.chunk(2)[1]
            added = {k: v.chunk(2)[1] for k, v in added.items()} if added else None
        image = control.image
        if image.shape[0] != sample.shape[0]:
            image = image.repeat(sample.shape[0] // image.shape[0], 1, 1, 1)
        down, mid = runner(sample, timestep, text, image, added)
        # A pooled ControlNet (shuffle) pools inside the module; guess mode's per-block scales skip it.
        *scales, last = residual_scales(len(down) + 1, control.unit.weight, guess and not pooled)
        down, mid = [d * s for d, s in zip(down, scales, strict=True)], mid * last
        if halve:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return list(down), mid
