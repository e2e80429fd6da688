"""AUTOMATIC1111 ``/sdapi/v1`` requests (the fields of ``modules/api/models.py``) mapped onto difftool tasks.

Fields difftool honours are mapped; fields it cannot honour are refused with a 422 naming the field
(never silently ignored), except sampler fine-tuning knobs (``eta``, ``s_churn``, ...) that only some
A1111 samplers read and that have no effect on difftool's schedulers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from difftool.core.errors import ParameterError
from difftool.core.task import RegistryView
from difftool.serve.a1111_controlnet import is_controlnet_script

#: ``override_settings`` / ``POST /options`` keys difftool honours.
SUPPORTED_OPTIONS = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "show_progress_every_n_steps")


class Txt2ImgRequest(BaseModel):
    """A1111's StableDiffusionProcessingTxt2Img API model, the fields difftool reads (others are checked)."""

    # NaN compares False with every bound, so it would pass each check below: refused at parsing (422).
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = Field(default=-1, ge=-1, le=2**63 - 1)  # torch's generator takes 64 bits; batches add to it
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = Field(default=1, ge=1)
    n_iter: int = Field(default=1, ge=1)
    steps: int = Field(default=50, ge=1)
    cfg_scale: float = 7.0
    width: int = Field(default=512, ge=8, le=4096)  # generate's own range
    height: int = Field(default=512, ge=8, le=4096)
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool = False
    hr_scale: float = Field(default=2.0, ge=1.0, le=4.0)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(default=0, ge=0)
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    denoising_strength: float | None = None  # txt2img: the hires pass's
    distilled_cfg_scale: float | None = Field(default=None, ge=0.0, le=50.0)  # Forge's, for Flux
    override_settings: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's StableDiffusionProcessingImg2Img API model (img2img and inpaint)."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int = Field(default=4, ge=0)
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(default=0, ge=0)
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


class ExtrasSingleImageRequest(BaseModel):
    """A1111's ExtrasSingleImageRequest."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    image: str = ""
    resize_mode: int = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


def refuse(field: str, why: str) -> ParameterError:
    return ParameterError(f"{field}: {why}", "drop that field (docs/serve.md lists what difftool supports)")


#: A1111 fields difftool has no model field for, with the values that mean "not used" (clients such as
#: webuiapi send them all): any other value is refused by name instead of being ignored.
UNUSED_FIELDS: dict[str, tuple[Any, ...]] = {
    "hr_checkpoint_name": (None, "", "Use same checkpoint"),
    "hr_scheduler": (None, "", "Use same scheduler"),
    "firstphase_width": (None, 0),
    "firstphase_height": (None, 0),
    "s_churn": (None, 0, 0.0),
    "s_tmin": (None, 0, 0.0),
    "s_tmax": (None, 0, 0.0, float("inf")),
    "s_noise": (None, 1, 1.0),
}


#: A1111 fields that change nothing difftool makes (whatever their value): saving and bookkeeping knobs, and
#: sampler fine-tuning read only by some A1111 samplers (``eta``, ``s_min_uncond``); ``image_cfg_scale`` is read
#: by instruct-pix2pix models only, which difftool does not run.
IGNORED_FIELDS = frozenset(
    {
        "do_not_save_samples",
        "do_not_save_grid",
        "override_settings_restore_afterwards",
        "eta",
        "s_min_uncond",
        "image_cfg_scale",
        "force_task_id",
        "comments",
    }
)
#: Extra fields read elsewhere (the refiner, webuiapi's deprecated ControlNet units).
READ_ELSEWHERE = frozenset({"refiner_checkpoint", "refiner_switch_at", "controlnet_units"})


def check_supported(req: Txt2ImgRequest) -> None:
    """Refuse (422) every field set to something difftool cannot do, and every field it does not know."""
    unknown = sorted(set(req.model_extra or {}) - set(UNUSED_FIELDS) - IGNORED_FIELDS - READ_ELSEWHERE)
    if unknown:
        raise refuse(unknown[0], "not a field difftool knows (an A1111 extension's or a typo), so it is not ignored")
    for name, unused in UNUSED_FIELDS.items():
        value = (req.model_extra or {}).get(name)
        if value not in unused:
            raise refuse(name, f"{value!r} cannot be honoured here (difftool has no such setting)")
    if req.restore_faces:
        raise refuse("restore_faces", "face restoration is not supported")
    if req.tiling:
        raise refuse("tiling", "seamless tiling is not supported")
    if req.styles:
        raise refuse("styles", "saved prompt styles are not supported; put the text in the prompt")
    if req.subseed_strength:
        raise refuse("subseed_strength", "variation seeds are not supported")
    if req.seed_resize_from_h > 0 or req.seed_resize_from_w > 0:
        raise refuse("seed_resize_from_w/h", "resizing seeds is not supported")
    if req.script_name:
        raise refuse("script_name", f"scripts are not supported ({req.script_name!r})")
    for name, script in req.alwayson_scripts.items():
        if is_controlnet_script(name):
            continue  # units become difftool's (a1111_controlnet.controlnet_units)
        args = script.get("args", []) if isinstance(script, dict) else script
        if args and args != [False]:  # an extension's "disabled" marker is fine
            raise refuse("alwayson_scripts", f"extension {name!r} is not available in difftool")
    if req.save_images:
        raise refuse("save_images", "the server keeps no image files; the response carries the images")
    unknown = sorted(set(req.override_settings or {}) - set(SUPPORTED_OPTIONS))
    if unknown:
        raise refuse("override_settings", f"option {unknown[0]!r} is not supported (supported: {SUPPORTED_OPTIONS})")


def hires_params(req: Txt2ImgRequest) -> dict[str, Any]:
    """A1111's hires fix as ``generate``'s ``--hires`` parameters (nothing when ``enable_hr`` is off)."""
    if not req.enable_hr:
        return {}
    if req.hr_resize_x or req.hr_resize_y:
        raise refuse("hr_resize_x/hr_resize_y", "give hr_scale instead (difftool scales both sides alike)")
    if req.hr_sampler_name and req.hr_sampler_name not in (req.sampler_name, "Use same sampler"):
        raise refuse("hr_sampler_name", "the hires pass uses the first pass's sampler")
    if (req.hr_prompt and req.hr_prompt != req.prompt) or (
        req.hr_negative_prompt and req.hr_negative_prompt != req.negative_prompt
    ):
        raise refuse("hr_prompt/hr_negative_prompt", "the hires pass uses the first pass's prompts")
    upscaler = req.hr_upscaler or "Latent"
    if upscaler.lower().startswith("latent") and upscaler != "Latent":
        raise refuse("hr_upscaler", f"{upscaler!r}: difftool's latent upscaler is A1111's 'Latent' (bilinear)")
    names = {"Latent": "latent", "difftool": "embedded"}  # /upscalers calls the embedded model "difftool"
    params: dict[str, Any] = {
        "hires": req.hr_scale,
        "hires_upscaler": names.get(upscaler, upscaler),
        "hires_strength": 0.7 if req.denoising_strength is None else req.denoising_strength,
    }
    if req.hr_second_pass_steps:
        params["hires_steps"] = req.hr_second_pass_steps
    return params


def refiner_params(req: Txt2ImgRequest, refiners: Sequence[str]) -> dict[str, Any]:
    """A1111's ``refiner_checkpoint``/``refiner_switch_at`` as ``generate``'s ``--refiner`` parameters.

    ``refiners``: the names of the listed SDXL refiners; any other checkpoint is refused (422), as is a
    switch point without a checkpoint. A1111 runs no refiner for ``refiner_switch_at`` 1.
    """
    extra = req.model_extra or {}
    checkpoint, switch = extra.get("refiner_checkpoint"), extra.get("refiner_switch_at")
    if checkpoint in (None, "", "None") or switch in (1, 1.0):
        if switch not in (None, 0, 0.0, 1, 1.0):
            raise refuse("refiner_switch_at", f"{switch!r} needs a refiner_checkpoint")
        return {}
    title = str(checkpoint)
    name = title.split(" [")[0].strip()
    found = next((n for n in (name, name.rsplit(".", 1)[0]) if n in refiners), None)
    if found is None:
        listed = ", ".join(refiners) or "none"
        raise refuse("refiner_checkpoint", f"{title!r} is not one of this server's SDXL refiners ({listed})")
    params: dict[str, Any] = {"refiner": found}
    if switch not in (None, 0, 0.0):
        try:
            params["refiner_switch"] = float(switch)
        except (TypeError, ValueError):
            raise refuse("refiner_switch_at", f"{switch!r} is not a number between 0 and 1") from None
    return params


def scheduler_for(sampler: str | None, schedule: str | None, registry: RegistryView) -> str | None:
    """The difftool scheduler for an A1111 sampler name (and, since A1111 1.9, its schedule type).

    Labels are the schedulers' A1111 names (``DPM++ 2M Karras``); ``DPM++ 2M`` with schedule ``Karras``
    is the same scheduler. The difftool name (``dpmpp-2m-karras``) is accepted too.
    """
    if not sampler:
        return None
    names = {e.label.lower(): e.name for e in registry.schedulers.values()}
    names.update({name.lower(): name for name in registry.schedulers})
    key, kind = sampler.strip().lower(), (schedule or "automatic").strip().lower()
    if kind not in ("automatic", "") and not key.endswith(" " + kind):
        combined = f"{key} {kind}"
        if combined in names:
            return names[combined]
        raise ParameterError(
            f"sampler {sampler!r} with schedule type {schedule!r} is not available",
            "use schedule type 'Automatic' or a sampler from GET /sdapi/v1/samplers",
        )
    if key in names:
        return names[key]
    raise ParameterError(f"unknown sampler {sampler!r}", "GET /sdapi/v1/samplers lists the samplers")


def flow_scheduler_for(sampler: str | None, schedule: str | None, registry: RegistryView) -> str | None:
    """Forge's names for the flow samplers (SD3 / Flux): ``Euler`` with schedule ``Simple``, ``Karras`` or
    ``Beta`` is ``Euler (flow)``, ``Euler Karras (flow)``, ``Euler Beta (flow)`` (the flow plugin's labels);
    any other pair is A1111's (:func:`scheduler_for`)."""
    names = {e.label.lower(): e.name for e in registry.schedulers.values()}
    kind = (schedule or "").strip().lower()
    if sampler and kind not in ("", "automatic"):
        key = sampler.strip().lower() + ("" if kind == "simple" else f" {kind}")
        if f"{key} (flow)" in names:
            return names[f"{key} (flow)"]
    return scheduler_for(sampler, schedule, registry)


def forge_params(req: Txt2ImgRequest, family: str) -> dict[str, Any]:
    """Forge's ``distilled_cfg_scale`` for a Flux model: the distilled guidance (``guidance_scale``), and
    ``cfg_scale`` above 1 then Flux's true CFG (``true_cfg``), as Forge runs them. A1111 clients, which send no
    ``distilled_cfg_scale``, give Flux's guidance as ``cfg_scale``; other models ignore it, as Forge does."""
    if req.distilled_cfg_scale is None or not family.startswith("flux"):
        return {}
    params: dict[str, Any] = {"guidance_scale": req.distilled_cfg_scale}
    if req.cfg_scale > 1:
        params["true_cfg"] = req.cfg_scale
    return params


def prompt_params(req: Txt2ImgRequest, registry: RegistryView, clip_skip: int | None) -> dict[str, Any]:
    """The prompt parameters every Stable Diffusion task shares."""
    params: dict[str, Any] = {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "steps": req.steps,
        "guidance_scale": req.cfg_scale,
        "scheduler": flow_scheduler_for(req.sampler_name or req.sampler_index, req.scheduler, registry),
    }
    override = (req.override_settings or {}).get("CLIP_stop_at_last_layers", clip_skip)
    if override is not None:
        try:
            params["clip_skip"] = int(override)
        except (TypeError, ValueError):
            raise ParameterError(
                f"override_settings.CLIP_stop_at_last_layers: {override!r} is not a whole number", "send 1 to 12"
            ) from None
    return {k: v for k, v in params.items() if v is not None}


def inpaint_params(req: Img2ImgRequest) -> dict[str, Any]:
    """A1111's inpaint fields as the inpaint task's parameters."""
    strength = req.denoising_strength
    if req.initial_noise_multiplier not in (None, 1, 1.0):
        raise refuse("initial_noise_multiplier", "only 1.0 is supported")
    fill: str | None
    if req.inpainting_fill == 0:
        fill = "blur"  # "fill": start from a smooth fill of the hole
    elif req.inpainting_fill == 1:
        fill = None  # "original": start from the image itself
    elif req.inpainting_fill in (2, 3) and strength >= 1.0:
        fill = "noise"  # latent noise / nothing: at strength 1 the start is pure noise either way
    else:
        raise refuse(
            "inpainting_fill",
            f"{req.inpainting_fill} ('latent noise'/'latent nothing') needs denoising_strength 1.0 in difftool; "
            "use 0 (fill) or 1 (original)",
        )
    if strength < 0.05:
        raise refuse("denoising_strength", f"{strength:g} is below difftool's inpaint minimum 0.05")
    params: dict[str, Any] = {
        "strength": min(1.0, strength),
        "feather": req.mask_blur,
        "only_masked": req.inpaint_full_res,
        "resize_mask": True,
    }
    if fill is not None:
        params["fill"] = fill
    if req.inpaint_full_res:
        params["context"] = req.inpaint_full_res_padding
    return params


def upscale_scale(req: ExtrasSingleImageRequest, choices: tuple[Any, ...]) -> int:
    """``upscaling_resize`` as one of the superres task's scales, or a 422."""
    unknown = sorted(set(req.model_extra or {}))
    if unknown:
        raise refuse(unknown[0], "not a field difftool knows (an A1111 extension's or a typo), so it is not ignored")
    if req.resize_mode != 0:
        raise refuse("resize_mode", "only 0 (scale by upscaling_resize) is supported")
    if req.gfpgan_visibility or req.codeformer_visibility:
        raise refuse("gfpgan_visibility/codeformer_visibility", "face restoration is not supported")
    if req.upscaler_2 not in ("None", "") and req.extras_upscaler_2_visibility > 0:
        raise refuse("upscaler_2", "a second upscaler is not supported")
    scale = req.upscaling_resize
    if not float(scale).is_integer() or int(scale) not in choices:
        raise refuse(
            "upscaling_resize", f"{scale:g} is not a scale difftool upscales by ({', '.join(map(str, choices))})"
        )
    return int(scale)
