"""A1111's ControlNet extension API: ``alwayson_scripts: {"ControlNet": {"args": [unit, ...]}}``.

Each enabled unit becomes one difftool ControlNet unit in its mapping form (``model``, ``image``,
``pre``, ``weight``, ``start``, ``end``, ``guess``, ``resize``, preprocessor options), which the
server then checks like any other (listed ControlNets only, inline images). Fields difftool cannot
honour are refused by name; those that only tune the extension's own preprocessing or memory use
(``processor_res``, ``pixel_perfect``, ``low_vram``) are ignored, and docs/serve.md says so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from difftool.core.errors import ParameterError
from difftool.core.metadata import a1111_module

#: The extension's resize modes, by name and by number, as difftool's ``resize=``.
RESIZE = {
    "just resize": "just",
    "crop and resize": "crop",
    "resize and fill": "fill",
    "0": "just",
    "1": "crop",
    "2": "fill",
}
#: Control modes: the extension's names and numbers; "My prompt is more important" has no diffusers twin.
CONTROL_MODES = {"balanced": False, "0": False, "controlnet is more important": True, "2": True}


def is_controlnet_script(name: str) -> bool:
    return name.strip().lower() == "controlnet"


def is_ip_adapter_unit(arg: Mapping[str, Any]) -> bool:
    """A unit whose module is one of the extension's IP-Adapter preprocessors (``ip-adapter_clip_sd15``, ...)."""
    return str(arg.get("module") or "").strip().lower().startswith("ip-adapter")


def controlnet_units(scripts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The enabled units of the request's ControlNet script (none: an empty list)."""
    units: list[dict[str, Any]] = []
    for name, script in scripts.items():
        if not is_controlnet_script(name):
            continue
        args = script.get("args", []) if isinstance(script, Mapping) else script
        for index, arg in enumerate(args or []):
            if arg is False or arg is None:
                continue
            if not isinstance(arg, Mapping):
                raise _refuse(index, "args", f"{arg!r} is not a ControlNet unit object")
            unit = _unit(index, arg)
            if unit is not None:
                units.append(unit)
    return units


def _unit(index: int, arg: Mapping[str, Any]) -> dict[str, Any] | None:
    if not arg.get("enabled", True):
        return None
    model = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", str(arg.get("model") or "")).strip()
    if not model or model.lower() == "none":
        return None  # the extension skips a unit without a model
    if is_ip_adapter_unit(arg):
        return None  # the reference parameters, not a ControlNet: a1111_reference.reference_params maps it
    if arg.get("mask") or arg.get("mask_image"):
        raise _refuse(index, "mask", "a unit's own mask is not supported; send the mask with the request")
    if str(arg.get("hr_option", "Both")) not in ("Both", "0"):
        raise _refuse(index, "hr_option", "the unit acts on every pass")
    mode = str(arg.get("control_mode", "Balanced")).strip().lower()
    if mode not in CONTROL_MODES:
        raise _refuse(
            index, "control_mode", f"{arg.get('control_mode')!r}: use 'Balanced' or 'ControlNet is more important'"
        )
    resize = RESIZE.get(str(arg.get("resize_mode", "Crop and Resize")).strip().lower())
    if resize is None:
        raise _refuse(index, "resize_mode", f"{arg.get('resize_mode')!r}: use one of {', '.join(list(RESIZE)[:3])}")
    image = arg.get("image") or arg.get("input_image") or None
    if isinstance(image, Mapping):  # the extension's {"image": ..., "mask": ...} form
        if image.get("mask"):
            raise _refuse(index, "image.mask", "a unit's own mask is not supported; send the mask with the request")
        image = image.get("image") or None
    pre = a1111_module(str(arg.get("module") or "none"))
    unit: dict[str, Any] = {
        "model": model,
        "image": image,
        "pre": pre,
        "weight": arg.get("weight", 1.0),
        "start": arg.get("guidance_start", 0.0),
        "end": arg.get("guidance_end", 1.0),
        "guess": CONTROL_MODES[mode],
        "resize": resize,
    }
    if pre == "canny":  # the extension's thresholds are canny's low and high (other modules: their own)
        unit["options"] = {"low": arg.get("threshold_a", 100), "high": arg.get("threshold_b", 200)}
    return unit


def _refuse(index: int, field: str, why: str) -> ParameterError:
    return ParameterError(
        f"alwayson_scripts.ControlNet.args[{index}].{field}: {why}",
        "change that field (docs/serve.md lists what difftool supports)",
    )
