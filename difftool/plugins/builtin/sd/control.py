"""ControlNet units as users write them: ``--control MODEL[=IMAGE][,key=value...]``, repeatable.

Fields: ``pre`` (preprocessor, default ``none``), ``weight`` (default 1), ``start`` / ``end`` (the
fraction of the steps the unit acts on, diffusers' ``control_guidance_start/end``), ``guess`` (guess
mode: the ControlNet sees only the conditional half of the batch). Any other field is an option of the
preprocessor (``low=50`` for canny). The Python API takes the same strings, or mappings with these
keys (``image`` may then be a PIL image or an array), or :class:`ControlUnit` s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftool.core.errors import ParameterError
from difftool.core.params import Resolver
from difftool.core.task import Param, RegistryView

if TYPE_CHECKING:
    from difftool.core.backend import ResolvedBackend

_FIELDS = ("model", "image", "pre", "weight", "start", "end", "guess", "resize")
_FIX = "write --control MODEL=IMAGE[,pre=canny][,weight=0.8][,start=0][,end=1][,guess=1][,resize=crop]"
#: How a control image of another shape than the output is fitted, by A1111's names: ``crop`` scales it
#: to cover the output and crops the middle (A1111's default), ``just`` stretches it, ``fill`` fits it
#: inside and pads the rest (black: no edges, no lines; -1 for the inpaint preprocessor: to be made).
RESIZE_MODES = {"crop": "Crop and Resize", "just": "Just Resize", "fill": "Resize and Fill"}
#: The families ``difftool models`` gives ControlNets: a unit's listed name must have one of them.
CONTROLNET_FAMILIES = ("sd1-controlnet", "sd2-controlnet", "sdxl-controlnet", "sd3-controlnet", "flux-controlnet")


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet and what it sees. ``image`` ``None``: the task's input image (style, inpaint)."""

    model: str
    image: Any = None
    pre: str = "none"
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess: bool = False
    #: The preprocessor's options, as given (validated against its declaration when the unit runs).
    options: tuple[tuple[str, str], ...] = field(default=())
    resize: str = "crop"

    def __str__(self) -> str:
        return format_unit(self)

    def resolved(self, resolver: Resolver) -> ControlUnit:
        """The unit with its model resolved (a file or folder, or a listed ControlNet) and its image, when a
        path, checked (:class:`~difftool.core.params.Resolvable`: the preflight calls it once)."""
        model, image = resolver.model(self.model, CONTROLNET_FAMILIES, "ControlNet"), self.image
        if isinstance(image, (str, Path)):
            image = resolver.file(image, "control image")
        return replace(self, model=model, image=image)


def format_unit(unit: ControlUnit) -> str:
    """A unit's string form, which :func:`parse_unit` reads back (records, metadata and the GUI show it)."""
    image = "" if unit.image is None else "=<image>"
    if isinstance(unit.image, (str, Path)):
        image = f"={unit.image}"
    parts = [f"{unit.model}{image}", f"pre={unit.pre}", f"weight={unit.weight:g}"]
    parts += [f"start={unit.start:g}", f"end={unit.end:g}"] + (["guess=1"] if unit.guess else [])
    parts += [f"resize={unit.resize}"] if unit.resize != "crop" else []
    return ",".join(parts + [f"{k}={v}" for k, v in unit.options])


def parse_unit(value: Any) -> ControlUnit:
    """A unit from its string form, a mapping of its fields, or a unit; one-line errors for bad fields.

    The one parser of ``--control`` (CLI, API, server, GUI): syntax only, no file is read; the preflight then
    resolves the unit's model and image (:meth:`ControlUnit.resolved`)."""
    if isinstance(value, ControlUnit):
        return value
    if isinstance(value, str):
        fields: dict[str, Any] = split_unit(value)
    elif isinstance(value, Mapping):
        fields = dict(value)
    else:
        raise ParameterError(f"--control {value!r} is not a ControlNet unit", _FIX)
    return _unit(fields, value)


def split_unit(text: str) -> dict[str, Any]:
    """The fields of a unit's string form as written (``model``, ``image`` or ``None``, then key=value
    pairs), not yet checked: what :func:`parse_unit` validates, and what the GUI's unit editor shows."""
    head, *rest = [part.strip() for part in text.split(",")]
    model, _, image = head.partition("=")
    fields: dict[str, Any] = {"model": model.strip(), "image": image.strip() or None}
    for part in rest:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"--control {text!r}: {part!r} is not key=value", _FIX)
        fields[key.strip()] = value.strip()
    return fields


def preprocess(registry: RegistryView, unit: ControlUnit, rgb: Any, mask: Any = None) -> Any:
    """``unit``'s preprocessor (looked up in ``registry``) on ``rgb`` (float H x W x 3 in [0, 1]), its
    options checked against the preprocessor's declaration: the control image before resizing."""
    import numpy as np

    entry = registry.preprocessor(unit.pre)
    declared = {p.name: p for p in entry.options}
    kwargs = {}
    for key, value in unit.options:
        if key not in declared:
            takes = ", ".join(declared) or "no options"
            raise ParameterError(f"preprocessor {unit.pre} has no option {key!r}", f"it takes: {takes}")
        kwargs[key] = declared[key].validate(value)
    out = np.asarray(entry.value(rgb, mask, **kwargs), dtype=np.float32)
    if out.ndim != 3 or out.shape[2] != 3:
        raise ParameterError(
            f"preprocessor {unit.pre} returned shape {out.shape}, not H x W x 3", "fix the preprocessor plugin"
        )
    return out


def _unit(fields: dict[str, Any], given: Any) -> ControlUnit:
    model = str(fields.pop("model", "") or "").strip()
    if not model:
        raise ParameterError(f"--control {given!r} names no ControlNet model", _FIX)
    image = fields.pop("image", None)
    given_options = dict(fields.pop("options", None) or {})  # the mapping form may nest them
    extra = {k: v for k, v in fields.items() if k not in _FIELDS} | given_options
    weight = _number(fields, "weight", 1.0, 0.0, 2.0)
    start, end = _number(fields, "start", 0.0, 0.0, 1.0), _number(fields, "end", 1.0, 0.0, 1.0)
    if start >= end:
        raise ParameterError(f"ControlNet {model}: start {start:g} is not before end {end:g}", "pass start < end")
    guess = Param("guess", "bool").validate(fields.get("guess", False))
    pre = str(fields.get("pre") or "none")
    options = tuple((str(k), str(v)) for k, v in extra.items() if k != "pre")
    resize = str(fields.get("resize") or "crop")
    if resize not in RESIZE_MODES:
        raise ParameterError(f"ControlNet resize {resize!r} is not one of {', '.join(RESIZE_MODES)}", _FIX)
    return ControlUnit(model, image, pre, weight, start, end, bool(guess), options, resize)


def _number(fields: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = fields.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"ControlNet {key} {value!r} is not a number", _FIX) from None
    if not low <= number <= high:
        raise ParameterError(f"ControlNet {key} {number:g} is outside [{low:g}, {high:g}]", _FIX)
    return number


CONTROL_PARAM = Param(
    "control",
    "string",
    help="ControlNet unit, repeatable: MODEL[=IMAGE][,pre=canny][,weight=1][,start=0][,end=1][,guess=1]"
    "[,resize=crop|just|fill]; MODEL is "
    "a file, folder or listed name; IMAGE defaults to the input image (style, inpaint); other key=value pairs "
    "are preprocessor options (canny: low, high)",
    multiple=True,
    multiline=True,
    parse=parse_unit,
)


def a1111_text(unit: ControlUnit, name: str, digest: str) -> str:
    """One ``ControlNet N`` value as A1111's ControlNet extension writes it (see :mod:`difftool.core.metadata`)."""
    from difftool.core.metadata import controlnet_text

    options = dict(unit.options)
    canny = unit.pre == "canny"  # A1111 records its thresholds, given or not
    thresholds = (options.get("low", "100"), options.get("high", "200")) if canny else (None, None)
    model = f"{name} [{digest[:8]}]"
    resize = RESIZE_MODES[unit.resize]
    return controlnet_text(unit.pre, model, unit.weight, unit.start, unit.end, unit.guess, thresholds, resize)


def check_backend(params: Mapping[str, Any], backend: ResolvedBackend) -> None:
    """``Task.check_backend`` for the tasks taking ``--control``: refused on a backend that runs no
    ControlNets, at preflight (before the Stable Diffusion model loads)."""
    if params["control"]:
        from difftool.plugins.builtin.sd.control_backend import capable

        capable(backend)
