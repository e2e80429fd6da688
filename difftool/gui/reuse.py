"""Reuse parameters: what a saved record fills in, and which of its values would make a run read files.

A record comes from this session's own history (trusted: the user made it) or from an image file
someone else may have written (untrusted). An untrusted record never sets ``allow_pickle``; its file
paths (a VAE, LoRAs, embeddings, ControlNet models and images, refiners, upscalers, masks) are listed
for the user to accept or leave out, and only paths that exist here are offered at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftool.core.task import Param

#: Never taken from a file: a record that says ``allow_pickle: true`` would have the run unpickle the
#: files it names, i.e. run code of the image's author.
NEVER_FROM_A_FILE = ("allow_pickle",)
#: String parameters that list files, comma-separated (``PATH[:WEIGHT]`` for LoRAs).
FILE_LISTS = ("lora", "embedding")
_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".engine", ".yaml", ".json"}
_SUFFIXES |= {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}


@dataclass
class Reuse:
    """What a record fills: form ``values``, the panel's ``options`` (model, backend, device, dtype,
    seed, backend_options), and the fields whose ``files`` exist here and those whose file is ``missing``."""

    task: str | None
    values: dict[str, Any]
    options: dict[str, Any]
    files: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    #: The values to use when the user leaves the files out (their fields emptied).
    without_files: dict[str, Any] = field(default_factory=dict)


def names_a_file(text: str) -> bool:
    """Whether ``text`` would be read as a file or folder by a run (not a keyword or a listed name)."""
    text = text.strip()
    if not text or text == "<image>":
        return False
    return (
        "/" in text
        or "\\" in text
        or text.startswith("~")
        or Path(text).suffix.lower() in _SUFFIXES
        or Path(text).expanduser().exists()
    )


def _exists(text: str) -> bool:
    return Path(text.strip()).expanduser().exists()


def _lora_path(item: str) -> str:
    """The file one ``--lora`` item names, read by the LoRA parser itself (its weight dropped)."""
    from difftool.core.errors import ParameterError
    from difftool.plugins.builtin.sd.lora import parse_lora

    try:
        specs = parse_lora(item).specs
    except ParameterError:  # a weight that is not finite: the whole item is the name
        return item
    return specs[0].name if specs else item


def _split_files(name: str, param: Param, value: Any) -> tuple[Any, Any, list[str], list[str]]:
    """``value`` of ``param``: (kept with its files, kept without them, files that exist, files that do not).

    A value that names no file is kept as it is both ways; one whose file is missing is dropped both ways.
    """
    if param.multiple and param.type in ("image", "path") and isinstance(value, (list, tuple)):  # references
        found = [str(v) for v in value if _exists(str(v))]
        return found or None, None, found, [str(v) for v in value if not _exists(str(v))]
    if param.type in ("image", "mask", "path"):
        text = str(value)
        if text == "<image>":  # painted or pasted: no file to come back from
            return None, None, [], [f"{name}: painted, not a file"]
        if _exists(text):
            return text, None, [text], []
        return None, None, [], [text]
    if name in FILE_LISTS and isinstance(value, str):
        kept, plain, found, gone = [], [], [], []
        for item in (part.strip() for part in value.split(",")):
            path = _lora_path(item) if name == "lora" else item
            if not item:
                continue
            if not names_a_file(path):
                kept.append(item)
                plain.append(item)
            elif _exists(path):
                kept.append(item)
                found.append(path)
            else:
                gone.append(path)
        return ",".join(kept) or None, ",".join(plain) or None, found, gone
    if param.type == "model" and isinstance(value, str):  # a keyword, a listed name, or a file
        if not names_a_file(value):
            return value, value, [], []
        return (value, None, [value], []) if _exists(value) else (None, None, [], [value])
    if name == "control":
        from difftool.core.errors import ParameterError
        from difftool.plugins.builtin.sd.control import split_unit

        units = value if isinstance(value, (list, tuple)) else str(value).splitlines()
        kept, plain, found, gone = [], [], [], []
        for unit in (str(u) for u in units if str(u).strip()):
            try:
                fields = split_unit(unit)
            except ParameterError:
                gone.append(unit)
                continue
            paths = [p for p in (fields["model"], fields["image"] or "") if names_a_file(p)]
            if any(not _exists(p) for p in paths):
                gone.append(unit)
                continue
            kept.append(unit)
            found += paths
            if not paths:
                plain.append(unit)
        return kept or None, plain or None, found, gone
    return value, value, [], []


def plan_reuse(
    record: dict[str, Any], a1111: dict[str, Any], params: tuple[Param, ...], trusted: bool, sampler_labels: Any = None
) -> Reuse:
    """What ``record`` (a difftool record) and ``a1111`` (parsed A1111 ``parameters``) fill in a form of ``params``.

    ``trusted``: the record is one of this session's own results (its ``allow_pickle`` is the user's).
    """
    values = dict(record)
    if a1111:  # A1111's text, with its labels and sampler names turned into this task's parameters
        from difftool.core.metadata import params_from_a1111

        for key, value in params_from_a1111(a1111, sampler_labels or {}).items():
            values.setdefault(key, value)
    options = {k: values[k] for k in ("model", "backend", "device", "dtype", "backend_options") if values.get(k)}
    if values.get("seed") not in (None, ""):
        options["seed"] = int(values["seed"])
    task = record.get("task") or a1111.get("difftool task")
    reuse = Reuse(task if isinstance(task, str) else None, {}, options)
    for param in params:
        value = values.get(param.name)
        if value is None:
            continue
        if param.name in NEVER_FROM_A_FILE and not trusted:
            continue
        with_files, without, found, gone = _split_files(param.name, param, value)
        if with_files is not None:
            reuse.values[param.name] = with_files
        if without is not None:
            reuse.without_files[param.name] = without
        if found:
            reuse.files[param.name] = found
        if gone:
            reuse.missing[param.name] = gone
    return reuse
