"""Generation parameters inside image files, written and read the way A1111 does.

* **PNG**: a ``parameters`` text chunk (A1111's text: prompt, ``Negative prompt:`` line, ``Key: value, ...``)
  and the full record as JSON in a ``difftool`` chunk.
* **JPEG and WebP**: the same text in the EXIF ``UserComment`` (``UNICODE`` prefix, UTF-16 big-endian, as
  A1111 writes it with piexif) and the JSON record in EXIF ``ImageDescription`` (ASCII-escaped). EXIF holds
  64 KiB: a prompt too long for it is cut there, marked (:data:`CUT_MARKER`) and warned about; the seed and
  settings always come through (PNG has no such limit).

Pillow writes and reads the EXIF itself; only the A1111 text format is ours.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from PIL import ExifTags, Image, PngImagePlugin

#: EXIF UserComment's character-code prefixes (EXIF 2.3, section 4.6.5).
_UNICODE, _ASCII = b"UNICODE\0", b"ASCII\0\0\0"
#: Formats whose metadata lives in EXIF.
EXIF_FORMATS = frozenset({"JPEG", "WEBP"})
#: A JPEG APP1 segment's payload limit (less its header).
EXIF_LIMIT = 65_000
log = logging.getLogger("difftool")


def encode(fmt: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for Pillow's ``save(format=fmt)`` that store ``record`` (nothing for other formats)."""
    as_json = json.dumps(record, sort_keys=True, default=str)  # ASCII: non-ASCII is escaped
    text = _encodable(format_parameters(record))
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        info.add_text("difftool", as_json)
        return {"pnginfo": info}
    if fmt in EXIF_FORMATS:
        # EXIF lives in one 64 KiB segment. Everything, if it fits; else the JSON copy's prompts are cut (the
        # A1111 text holds them whole; the JSON keeps the job's fingerprint and input hash, which a rerun's
        # "up to date" reads); else the prompts are cut in both, with a marker and a warning, so the seed
        # and settings always come through.
        data = _exif(as_json, text)
        if data is not None:
            return {"exif": data}
        whole = max(len(str(record.get(key) or "")) for key in PROMPT_KEYS)
        data = _longest(lambda keep: _exif(_cut_json(record, keep), text), whole)
        if data is not None:
            return {"exif": data[1]}
        data = _longest(lambda keep: _exif(_cut_json(record, keep), _cut_text(record, keep)), whole)
        if data is not None:
            log.warning(
                "the prompt is too long for %s metadata (EXIF holds 64 KiB): written cut to %d characters, "
                "with the seed and settings; save as PNG to keep it whole",
                fmt,
                data[0],
            )
            return {"exif": data[1]}
        log.warning("the parameters are too long for %s metadata (EXIF holds 64 KiB): none written", fmt)
    return {}


PROMPT_KEYS = ("prompt", "negative_prompt")
#: Ends a prompt cut to fit EXIF's 64 KiB (JPEG, WebP): whoever reads it back sees it is not the whole.
CUT_MARKER = " [...cut by difftool: EXIF holds 64 KiB; the PNG keeps it whole]"


def _exif(description: str, text: str) -> bytes | None:
    """The EXIF bytes holding the JSON record and the A1111 text, or ``None`` if over :data:`EXIF_LIMIT`."""
    exif = Image.Exif()
    exif[ExifTags.Base.ImageDescription] = description
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = _UNICODE + text.encode("utf-16-be")
    data = exif.tobytes()
    return data if len(data) <= EXIF_LIMIT else None


def _cut(record: Mapping[str, Any], keep: int) -> dict[str, Any]:
    """``record`` with each prompt over ``keep`` characters cut to ``keep`` plus :data:`CUT_MARKER`."""
    cut = dict(record)
    for key in PROMPT_KEYS:
        value = str(record.get(key) or "")
        if len(value) > keep:
            cut[key] = value[:keep] + CUT_MARKER
    return cut


def _cut_json(record: Mapping[str, Any], keep: int) -> str:
    return json.dumps(_cut(record, keep), sort_keys=True, default=str)


def _cut_text(record: Mapping[str, Any], keep: int) -> str:
    return _encodable(format_parameters(_cut(record, keep)))


def _longest(attempt: Any, whole: int) -> tuple[int, bytes] | None:
    """The largest ``keep`` below ``whole`` for which ``attempt(keep)`` gives bytes, by bisection (a longer
    cut never fits where a shorter one did not): ``(keep, bytes)``, or ``None`` if even 0 does not fit."""
    best = attempt(0)
    if best is None:
        return None
    low, high = 0, whole  # attempt(whole) is the uncut record, which did not fit
    while high - low > 1:
        middle = (low + high) // 2
        data = attempt(middle)
        if data is None:
            high = middle
        else:
            low, best = middle, data
    return low, best


def _encodable(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udcff``: a file or model named in bytes that are not
    UTF-8 (Python's ``surrogateescape``) cannot be encoded as UTF-8 or UTF-16 as it is. (The JSON record
    escapes them the same way, and its ``json.loads`` gives the name back exactly.)"""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def decode(image: Image.Image) -> dict[str, Any]:
    """``{"difftool": {...}, "parameters": {...}}`` from an open image (either key may be absent)."""
    text = dict(getattr(image, "text", {}) or image.info)
    if image.format in EXIF_FORMATS or "exif" in image.info:
        try:
            exif = image.getexif()
            comment = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
            description = exif.get(ExifTags.Base.ImageDescription)
            comment = _user_comment(comment) if isinstance(comment, bytes) else None
        except (OSError, ValueError, SyntaxError, UnicodeError):  # corrupt EXIF: no metadata; the image is fine
            comment = description = None
        # A camera's comment ("Happy birthday") is not a prompt: only text with A1111's settings line is.
        if comment and _SETTINGS_LINE.search(comment) and "parameters" not in text:
            text["parameters"] = comment
        if isinstance(description, str) and description.startswith("{") and "difftool" not in text:
            text["difftool"] = description
    found: dict[str, Any] = {}
    if isinstance(text.get("difftool"), str):
        try:
            found["difftool"] = json.loads(text["difftool"])
        except json.JSONDecodeError:
            pass
    if isinstance(text.get("parameters"), str) and text["parameters"]:
        found["parameters"] = parse_parameters(text["parameters"])
    return found


def _user_comment(raw: bytes) -> str:
    """Decode an EXIF UserComment; UNICODE is UTF-16 (big-endian unless a byte-order mark says otherwise)."""
    prefix, body = raw[:8], raw[8:]
    if prefix == _UNICODE:
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16", errors="replace")
        return body.decode("utf-16-be", errors="replace")
    return body.decode("utf-8" if prefix == _ASCII else "latin-1", errors="replace").rstrip("\0")


_A1111_KEYS = (
    ("steps", "Steps"),
    ("scheduler", "Sampler"),
    ("guidance_scale", "CFG scale"),
    ("distilled_guidance", "Distilled CFG Scale"),
    ("shift", "Shift"),
    ("seed", "Seed"),
    ("size", "Size"),
    ("model_hash", "Model hash"),
    ("model", "Model"),
    ("vae", "VAE"),
    ("clip_skip", "Clip skip"),
    ("lora_hashes", "Lora hashes"),
    ("ti_hashes", "TI hashes"),
    ("pad_conds", "Pad conds"),
    ("strength", "Denoising strength"),
    ("hires_strength", "Denoising strength"),
    ("hires", "Hires upscale"),
    ("hires_steps", "Hires steps"),
    ("hires_upscaler", "Hires upscaler"),
    ("refiner_title", "Refiner"),
    ("refiner_switch", "Refiner switch at"),
    ("scale", "Upscale"),
    ("task", "difftool task"),
)


def format_parameters(record: Mapping[str, Any]) -> str:
    """The A1111 ``parameters`` text: prompt, ``Negative prompt:`` line, then ``Key: value, ...``."""
    record = {**record, "scheduler": record.get("scheduler_label") or record.get("scheduler"), **_refiner(record)}
    if record.get("distilled_guidance") is not None:  # Forge: CFG scale is the true CFG (1: none) beside it
        record["guidance_scale"] = record.get("true_cfg") or 1
    lines = [_escape(str(record.get("prompt", "") or ""))]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {_escape(str(record['negative_prompt']))}")
    fields = [f"{label}: {_quote(record[key])}" for key, label in _A1111_KEYS if record.get(key) not in (None, "")]
    fields += [f"ControlNet {i}: {_quote(text)}" for i, text in enumerate(record.get("controlnet") or ())]
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _refiner(record: Mapping[str, Any]) -> dict[str, Any]:
    """A1111's ``Refiner: name [hash]`` (its checkpoint title); the switch only with a refiner."""
    if not record.get("refiner"):
        return {"refiner_switch": None}
    digest = record.get("refiner_hash")
    return {"refiner_title": f"{record['refiner']} [{digest}]" if digest else record["refiner"]}


def _quote(value: Any) -> str:
    """A1111 quotes values that hold a comma (``Lora hashes: "a: 1, b: 2"``)."""
    text = str(value)
    return json.dumps(text) if "," in text or '"' in text else text


#: A1111's settings line, which every generation's parameters text ends with.
_SETTINGS_LINE = re.compile(r"(^|\n)(Steps|difftool task|Seed|Size|Upscale): ")
#: One ``Key: value`` of the settings line; a value is either quoted (JSON string) or runs to the next comma.
_SETTING = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


#: A prompt's line that would read as the ``Negative prompt:`` line, escaped with a backslash when written
#: (and one more backslash on a line that already starts with backslashes before it), unescaped when read.
_ESCAPED = re.compile(r"^\\+Negative prompt:")
_NEEDS_ESCAPE = re.compile(r"^(\\*Negative prompt:)", re.MULTILINE)


def _escape(text: str) -> str:
    """``text`` (a prompt) with each line that would start the negative prompt made to read as text."""
    return _NEEDS_ESCAPE.sub(r"\\\1", text)


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse an A1111 ``parameters`` text into ``prompt``, ``negative_prompt`` and its ``Key: value`` pairs."""
    lines = text.split("\n")
    result: dict[str, Any] = {}
    settings = lines[-1] if len(lines) > 1 or ": " in lines[-1] else ""
    body = lines[:-1] if settings else lines
    prompt_lines, negative = [], None
    for line in body:
        if line.startswith("Negative prompt:"):
            negative = line[len("Negative prompt:") :].strip()
            negative = negative[1:] if _ESCAPED.match(negative) else negative
            continue
        line = line[1:] if _ESCAPED.match(line) else line
        if negative is not None:
            negative += "\n" + line
        else:
            prompt_lines.append(line)
    result["prompt"] = "\n".join(prompt_lines)
    if negative is not None:
        result["negative_prompt"] = negative
    for key, value in _SETTING.findall(settings):
        value = value.strip()
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        result[key.strip()] = value
    return result


def params_from_a1111(parsed: Mapping[str, Any], sampler_names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Task parameters from parsed A1111 ``parameters`` (:func:`parse_parameters`), typed, for a form to reuse.

    ``sampler_names`` maps A1111 sampler labels (``DPM++ 2M Karras``) to scheduler names. ``Denoising
    strength`` is the hires pass's when the text has ``Hires upscale``, else img2img's.
    """
    out: dict[str, Any] = {}
    for key in ("prompt", "negative_prompt"):
        if parsed.get(key):
            out[key] = parsed[key]
    typed = {"Steps": ("steps", int), "CFG scale": ("guidance_scale", float), "Seed": ("seed", int)}
    typed |= {"Clip skip": ("clip_skip", int), "Hires upscale": ("hires", float), "Hires steps": ("hires_steps", int)}
    typed |= {"Refiner switch at": ("refiner_switch", float), "Shift": ("shift", float)}
    if parsed.get("Distilled CFG Scale"):  # Forge's guidance-distilled models: CFG scale is the true CFG
        typed |= {"Distilled CFG Scale": ("guidance_scale", float), "CFG scale": ("true_cfg", float)}
    for label, (name, kind) in typed.items():
        try:
            out[name] = kind(parsed[label])
        except (KeyError, TypeError, ValueError):
            continue
    if out.get("true_cfg", 2.0) <= 1.0:  # Forge's "CFG scale: 1": no true CFG ran
        del out["true_cfg"]
    size = re.fullmatch(r"(\d+)x(\d+)", str(parsed.get("Size", "")))
    if size:
        out["width"], out["height"] = int(size.group(1)), int(size.group(2))
    if parsed.get("Denoising strength"):
        try:
            out["hires_strength" if "hires" in out else "strength"] = float(parsed["Denoising strength"])
        except ValueError:
            pass
    if parsed.get("Hires upscaler"):
        upscaler = str(parsed["Hires upscaler"])
        out["hires_upscaler"] = "latent" if upscaler.lower().startswith("latent") else upscaler
    if parsed.get("Refiner"):  # A1111 writes the checkpoint's title, ``name [hash]``
        out["refiner"] = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", str(parsed["Refiner"])).strip()
    sampler = parsed.get("Sampler")
    if sampler and sampler_names and sampler in sampler_names:
        out["scheduler"] = sampler_names[sampler]
    texts = [str(parsed[key]) for key in sorted(parsed) if re.fullmatch(r"ControlNet \d+", key)]
    references = [reference_params(text) for text in texts if reference_params(text)]
    out.update(references[0] if references else {})  # an IP-Adapter unit: --ip-adapter, not a --control
    units = [controlnet_spec(text) for text in texts if not reference_params(text)]
    if any(units):
        out["control"] = [unit for unit in units if unit]
    return out


# --- A1111's ControlNet extension: ``ControlNet 0: "Module: canny, Model: name [hash], Weight: 1, ..."`` ----

#: How the sd-webui-controlnet extension names guess mode, and its names of difftool's preprocessors.
_CONTROL_MODES = {False: "Balanced", True: "ControlNet is more important"}
_A1111_MODULES = {
    "tile_resample": "tile",
    "blur_gaussian": "blur",
    "inpaint_only": "inpaint",
    "lineart_standard (from white bg & black line)": "lineart",
    "invert (from white bg & black line)": "invert",
    "scribble_xdog": "scribble",
}
#: A1111's resize modes (its enum's names and values) by difftool's ``resize=`` name.
_RESIZE_MODES = {
    "Just Resize": "just",
    "Crop and Resize": "crop",
    "Resize and Fill": "fill",
    "ResizeMode.RESIZE": "just",
    "ResizeMode.INNER_FIT": "crop",
    "ResizeMode.OUTER_FIT": "fill",
}
_CONTROL_PAIR = re.compile(r"\s*([\w ]+):\s*([^,]*)")


def a1111_module(name: str) -> str:
    """difftool's preprocessor for an A1111 ControlNet module name (unknown names pass through)."""
    return _A1111_MODULES.get(name, name)


def controlnet_text(
    module: str,
    model: str,
    weight: float,
    start: float,
    end: float,
    guess: bool,
    thresholds: tuple[Any, Any] = (None, None),
    resize: str = "Crop and Resize",
) -> str:
    """One ControlNet unit's value in the ``parameters`` text, as A1111's ControlNet extension writes it."""
    fields = [f"Module: {module}", f"Model: {model}", f"Weight: {weight:g}", f"Resize Mode: {resize}"]
    fields += [f"Threshold {ab}: {value}" for ab, value in zip("AB", thresholds, strict=True) if value is not None]
    fields += [f"Guidance Start: {start:g}", f"Guidance End: {end:g}", f"Control Mode: {_CONTROL_MODES[guess]}"]
    return ", ".join(fields)


def reference_params(text: str) -> dict[str, Any]:
    """``ip_adapter``, ``reference_weight`` and ``reference_mode`` from a ``ControlNet N`` value whose module is an
    IP-Adapter one (``ip-adapter_clip_sd15``, ...); empty for other units. The reference image is not in the
    text (A1111 records no unit image): pass it again with ``--reference``."""
    pairs = {k.strip(): v.strip() for k, v in _CONTROL_PAIR.findall(text)}
    if not pairs.get("Module", "").lower().startswith("ip-adapter"):
        return {}
    model = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", pairs.get("Model", "")).strip()
    if not model or model.lower() == "none":
        return {}
    out: dict[str, Any] = {"ip_adapter": model, "reference_mode": pairs.get("Reference Mode") or "all"}
    try:
        out["reference_weight"] = float(pairs.get("Weight", "1"))
    except ValueError:
        pass
    return out


def controlnet_spec(text: str) -> str | None:
    """A ``--control`` value from a ``ControlNet N`` value; A1111 records no image, so it has none (add
    ``=IMAGE`` after the model). ``None`` when the unit names no model."""
    pairs = {k.strip(): v.strip() for k, v in _CONTROL_PAIR.findall(text)}
    model = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", pairs.get("Model", "")).strip()
    if not model or model.lower() == "none":
        return None
    module = a1111_module(pairs.get("Module") or "none")
    parts = [model, f"pre={module}", f"weight={pairs.get('Weight', '1')}"]
    parts += [f"start={pairs.get('Guidance Start', '0')}", f"end={pairs.get('Guidance End', '1')}"]
    if pairs.get("Control Mode") == _CONTROL_MODES[True]:
        parts.append("guess=1")
    resize = _RESIZE_MODES.get(pairs.get("Resize Mode", ""), "crop")
    parts += [f"resize={resize}"] if resize != "crop" else []
    if module == "canny":
        thresholds = (("A", "low"), ("B", "high"))
        parts += [f"{key}={pairs[f'Threshold {ab}']}" for ab, key in thresholds if f"Threshold {ab}" in pairs]
    return ",".join(parts)
