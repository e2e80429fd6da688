"""ControlNet for SD3 and Flux at sampling time, step for step as diffusers' StableDiffusion3ControlNetPipeline
and FluxControlNetPipeline: the same ``--control`` units as Stable Diffusion (:mod:`..sd.control`).

The control image is preprocessed and resized as for SD, then encoded by the model's VAE: Flux samples the
latent distribution with the run's generator before the noise is drawn, and packs it into 2 x 2 patch
tokens (XLabs-style ControlNets with a hint block take the pixels instead); SD3 takes the distribution's
mean (diffusers samples it from the unseeded global generator, so its image is not reproducible; a real
VAE's spread there is far below a pixel step), without the VAE's shift for InstantX's ControlNets.
:class:`~.control_denoiser.ControlledFlowDenoiser` runs each unit's ControlNet on every call (weight times diffusers'
``control_guidance_start/end`` keep schedule) and hands the summed residuals to the transformer in the
conditioning (``controlnet_block_samples`` / ``controlnet_single_block_samples`` for Flux,
``block_controlnet_hidden_states`` for SD3: diffusers' argument names).

Union ControlNets (InstantX's and Shakker-Labs' Flux union, ``num_mode`` in the config) take a mode per
unit: ``mode=canny|tile|depth|blur|pose|gray|lq`` (or its number), else the one the unit's preprocessor
implies (canny, tile, blur).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from difftool.core.errors import ParameterError
from difftool.core.models import model_path
from difftool.core.task import RunContext
from difftool.plugins.builtin.flow import controlnet
from difftool.plugins.builtin.flow.denoiser import pack
from difftool.plugins.builtin.sd.control import CONTROLNET_FAMILIES, ControlUnit

#: The InstantX / Shakker-Labs Flux union ControlNets' modes (their model cards' numbering).
UNION_MODES = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}
#: A union mode's other names (A1111's, ComfyUI's).
ALIASES = {"openpose": "pose", "grayscale": "gray", "low-quality": "lq", "low_quality": "lq"}
#: The mode a unit's preprocessor implies when it names none.
PRE_MODES = {"canny": "canny", "tile": "tile", "blur": "blur"}


@dataclass
class FlowControl:
    """A unit ready to run: its ControlNet, the control input (packed latents, latents or pixels), its union
    mode and the distilled guidance a guidance-embedding Flux ControlNet takes."""

    unit: ControlUnit
    net: controlnet.FlowControlNet
    cond: torch.Tensor
    mode: int | None = None
    guidance: float = 1.0


def check_task(task: str, params: Mapping[str, Any], label: str) -> None:
    """``--control`` runs with ``generate`` for these families; other tasks refuse it in one line."""
    if task != "generate" and params["control"]:
        raise ParameterError(f"--control runs with generate for {label} models, not {task} yet", "drop --control")


def union_mode(unit: ControlUnit, net: controlnet.FlowControlNet) -> int | None:
    """The unit's union mode (``mode=``, else its preprocessor's), checked against the ControlNet."""
    given = dict(unit.options).get("mode")
    if not net.union:
        if given is not None:
            raise ParameterError(f"ControlNet {net.name} is not a union ControlNet", "drop mode= from its --control")
        return None
    count = int(net.module.config.num_mode)
    name = ALIASES.get(str(given).lower(), str(given).lower()) if given is not None else PRE_MODES.get(unit.pre)
    if name is None:
        raise ParameterError(
            f"union ControlNet {net.name} needs a mode for preprocessor {unit.pre}",
            f"add mode=NAME to its --control ({', '.join(UNION_MODES)}) or a number below {count}",
        )
    mode = int(name) if name.isdigit() else UNION_MODES.get(name)
    if mode is None or mode >= count:
        raise ParameterError(
            f"union ControlNet {net.name} has no mode {given}", f"use one of {', '.join(UNION_MODES)} (below {count})"
        )
    return mode


def controls_for(
    params: Mapping[str, Any], model: Any, context: RunContext, size: tuple[int, int], guidance: float
) -> list[FlowControl]:
    """The request's ``control`` units loaded, checked against the model and encoded for ``size``, in
    diffusers' order (before the noise); recorded in the run's notes as SD's units are."""
    units: Sequence[ControlUnit] = params["control"] or ()
    if not units:
        return []
    from difftool.plugins.builtin.sd.controlled import record

    for unit in units:
        context.registry.preprocessor(unit.pre)  # an unknown name fails before the models load
        if unit.guess:
            raise ParameterError(f"{model.family.label} ControlNets have no guess mode", "drop guess=1")
    paths = [model_path(u.model, context.registry, CONTROLNET_FAMILIES, "ControlNet") for u in units]
    for path in paths:
        if controlnet.arch_of(path) is None:  # an SD 1.x / 2.x / SDXL ControlNet, or none at all
            from difftool.plugins.builtin.sd.controlnet import detect

            base = detect(path)
            what = f"an {base.removesuffix('-controlnet')} ControlNet" if base else "no ControlNet difftool reads"
            raise ParameterError(
                f"ControlNet {path.name} is {what}, the model is {model.family.label}",
                f"use a ControlNet made for {model.family.label} in the diffusers layout (a folder, or a file with "
                "diffusers key names; `difftool models` lists each one's family)",
            )
    head = int(model.transformer.config.attention_head_dim)
    nets = [controlnet.loaded(path, context, head) for path in paths]
    for net in nets:
        controlnet.check_pairing(net, model.family, model.transformer)
        controlnet.share_pos_embed(net, model.transformer)
    modes = [union_mode(unit, net) for unit, net in zip(units, nets, strict=True)]  # checked before any encoding
    controls = [
        FlowControl(unit, net, _encode(model, net, unit, size, context), mode, guidance)
        for unit, net, mode in zip(units, nets, modes, strict=True)
    ]
    context.notes.update(record(controls))
    return controls


def _encode(
    model: Any, net: controlnet.FlowControlNet, unit: ControlUnit, size: tuple[int, int], context: RunContext
) -> torch.Tensor:
    from difftool.plugins.builtin.flow.pipeline import on_device
    from difftool.plugins.builtin.sd.controlled import control_image

    plain = replace(unit, options=tuple(o for o in unit.options if o[0] != "mode"))  # mode= is not the preprocessor's
    pixels = control_image(plain, size, context, None) * 2 - 1  # diffusers' image processor: [-1, 1]
    if net.arch == "flux" and net.module.input_hint_block is not None:
        return pixels  # XLabs-style: the ControlNet embeds the pixels itself
    vae = model.vae
    dtype = torch.float32 if context.torch_dtype == torch.float16 else context.torch_dtype
    torch.nn.Module.to(vae, dtype=dtype).eval()
    with on_device(vae, context), torch.inference_mode():
        dist = vae.encode(pixels.to(context.torch_device, dtype)).latent_dist
        latents = dist.sample(generator=context.generator) if net.arch == "flux" else dist.mode()
    zeros_pooled = net.arch == "sd3" and net.module.config.force_zeros_for_pooled_projection
    shift = 0.0 if zeros_pooled else vae.config.shift_factor  # InstantX's SD3 ControlNets: no shift
    latents = ((latents - shift) * vae.config.scaling_factor).float().cpu()
    return pack(latents) if net.arch == "flux" else latents
