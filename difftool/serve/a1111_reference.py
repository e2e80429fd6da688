"""A1111's ControlNet IP-Adapter units as difftool's reference parameters (IP-Adapter).

A unit with ``module: ip-adapter_clip_sd15`` (``ip-adapter_clip_sdxl``, ``ip-adapter_clip_sdxl_plus_vith``,
``ip-adapter_clip_h``, ``ip-adapter-auto`` ...) and an IP-Adapter ``model`` becomes:

- ``reference``: the unit's image, sent inline as ``{"image": base64}``; the server decodes it within its body
  and pixel limits when it checks the request (:func:`difftool.serve.security.check_params`), as it does a
  ControlNet unit's image, and the task encodes it from memory: no file is written;
- ``ip_adapter``: the model's name (``name [hash]``: the hash is ignored, as for ControlNets), one of the
  IP-Adapters in the model folders' ``ipadapter/`` (``models/ipadapter``), or a path inside an
  ``--allow-path`` folder; the image encoder is found as on the command line;
- ``reference_weight``: ``weight``; ``reference_mode``: difftool's own ``reference_mode`` field if sent.

What difftool cannot honour is refused by field: a second IP-Adapter unit, a face model (Face ID, PuLID and
InstantID need face embeddings), ``guidance_start``/``guidance_end`` other than 0/1, a unit mask, a unit
acting on one hires pass only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from difftool.core.errors import ParameterError
from difftool.core.models import ModelRef
from difftool.serve.a1111_controlnet import is_controlnet_script, is_ip_adapter_unit
from difftool.serve.security import PathPolicy

#: The extension's IP-Adapter preprocessors that give CLIP image embeddings (difftool finds the encoder the
#: adapter needs by its width, so the ViT-H / ViT-bigG variants all map the same way).
CLIP_MODULES = re.compile(r"ip-adapter(_clip_\w+|-auto|_auto)")


def reference_params(scripts: Mapping[str, Any], policy: PathPolicy) -> dict[str, Any]:
    """The reference parameters of the request's IP-Adapter unit (none: an empty dict)."""
    found: dict[str, Any] = {}
    for name, script in scripts.items():
        if not is_controlnet_script(name):
            continue
        args = script.get("args", []) if isinstance(script, Mapping) else script
        for index, arg in enumerate(args or []):
            if not isinstance(arg, Mapping) or not is_ip_adapter_unit(arg) or not arg.get("enabled", True):
                continue  # not a unit object: a1111_controlnet refuses it
            model = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", str(arg.get("model") or "")).strip()
            if not model or model.lower() == "none":
                continue  # the extension skips a unit without a model
            if found:
                raise _refuse(index, "module", "difftool applies one IP-Adapter unit per request")
            found = _unit(index, arg, model, policy)
    return found


def _unit(index: int, arg: Mapping[str, Any], model: str, policy: PathPolicy) -> dict[str, Any]:
    module = str(arg.get("module")).strip().lower()
    if not CLIP_MODULES.fullmatch(module):
        raise _refuse(
            index, "module", f"{arg.get('module')!r}: difftool runs IP-Adapters on CLIP image embeddings only "
            "(ip-adapter_clip_sd15, ip-adapter_clip_sdxl, ip-adapter_clip_sdxl_plus_vith, ip-adapter-auto)",
        )  # fmt: skip
    if arg.get("mask") or arg.get("mask_image"):
        raise _refuse(index, "mask", "an IP-Adapter unit takes no mask")
    if str(arg.get("hr_option", "Both")) not in ("Both", "0"):
        raise _refuse(index, "hr_option", "the reference acts on every pass")
    for field, default in (("guidance_start", 0.0), ("guidance_end", 1.0)):
        if _number(index, field, arg.get(field, default)) != default:
            raise _refuse(index, field, f"the reference acts on every step: send {default:g}")
    image = arg.get("image") or arg.get("input_image") or None
    if isinstance(image, Mapping):  # the extension's {"image": ..., "mask": ...} form
        if image.get("mask"):
            raise _refuse(index, "image.mask", "an IP-Adapter unit takes no mask")
        image = image.get("image") or None
    if not image:
        raise _refuse(index, "image", "an IP-Adapter unit needs its reference image (base64)")
    out = {"reference": [{"image": image}], "ip_adapter": _adapter(index, model, policy)}
    out["reference_weight"] = _number(index, "weight", arg.get("weight", 1.0))
    if arg.get("reference_mode"):  # difftool's own field (InstantStyle): all, style or composition
        out["reference_mode"] = arg["reference_mode"]
    return out


def _adapter(index: int, model: str, policy: PathPolicy) -> str:
    """The IP-Adapter ``model`` names, as the server resolves a ControlNet's: a listed one (its own folders),
    else a path inside an allowed folder (checked with the other paths)."""
    from difftool.plugins.builtin.sd.ip_adapter_files import listed_adapters

    for path in listed_adapters():
        if model in (path.name, path.stem):
            return ModelRef(str(path), path)  # resolved here: the path check passes it on as it is
    if policy.roots and "/" in model:
        return model
    raise _refuse(index, "model", f"{model!r} is not one of this server's IP-Adapters (models/ipadapter)")


def _number(index: int, field: str, value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise _refuse(index, field, f"{str(value)[:40]!r} is not a number") from None


def _refuse(index: int, field: str, why: str) -> ParameterError:
    return ParameterError(
        f"alwayson_scripts.ControlNet.args[{index}].{field}: {why}",
        "change that field (docs/serve.md lists what difftool supports)",
    )
