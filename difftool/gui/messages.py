"""Errors in the window's words: the same message the CLI prints, rendered for the form an artist sees.

Errors are written once, in CLI terms (``pass --mask FILE``); tasks and plugins never write GUI
variants. :func:`for_the_window` turns each option the message names into the field that sets it and
returns those fields, so the window can highlight them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import Any

#: Options that are not task parameters: the task panel's own boxes (option -> field label).
PANEL_FIELDS = {
    "model": "model",
    "backend": "backend",
    "device": "device",
    "dtype": "precision",
    "seed": "seed",
    "backend-opt": "backend options",
}
#: ``pass --name VALUE`` (VALUE in capitals, or a literal like ``1`` or ``cuda``), or a bare ``--name``.
_PASS = re.compile(r"\bpass (--[a-z][a-z0-9-]*)(?: ([A-Z][A-Z0-9_,.:\[\]|]*|[\w.|=,]+(?=[ ;,)]|$)))?")
_WRITE = re.compile(r"\bwrite (--[a-z][a-z0-9-]*) [^;]*")
_FILE_VALUE = re.compile(r"(?<!pass )(--[a-z][a-z0-9-]*) ([\w-]+\.[a-z]\w*)\b")
#: The CLI's ``--debug`` traceback is the error box's Details in the window.
_DEBUG = (
    (re.compile(r"run with --debug for the traceback and report it"), "the traceback is under Details; report it"),
    (re.compile(r"run with --debug for the traceback"), "the traceback is under Details"),
    (re.compile(r"\(--debug shows the traceback\)"), "(Details shows the traceback)"),
    (re.compile(r"--debug shows the traceback"), "Details shows the traceback"),
)
_OPTION = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")
_CLI_ONLY = re.compile(r" or (?:a name from )?`difftool [^`]*`")


def for_the_window(message: str, params: Collection[str], masks: Collection[str] = ()) -> tuple[str, list[str]]:
    """``message`` with each ``--option`` replaced by the field that sets it, and those fields' names.

    ``params`` are the form's parameter names (``clip_skip``), ``masks`` those that can be painted.
    Options the window has no field for (``--overwrite``) are left as they are.
    """
    fields: list[str] = []

    def field(option: str) -> tuple[str, str] | None:
        name = option[2:]
        if name in PANEL_FIELDS:
            return name, PANEL_FIELDS[name]
        param = name.replace("-", "_")
        if param in params:
            return param, param.replace("_", " ")
        return None

    def note(name: str) -> None:
        if name not in fields:
            fields.append(name)

    def rewrite_pass(match: re.Match[str]) -> str:
        found = field(match.group(1))
        if found is None:
            return match.group(0)
        name, label = found
        note(name)
        value = match.group(2)
        if name == "model":
            return f'choose a model in "{label}" (a listed one, or Browse…)'
        if name in masks:
            return f'paint the mask on the image (Mask panel, "paint mask") or choose a file in "{label}"'
        if value in (None, "FILE", "PATH", "DIR"):
            return f'set "{label}"'
        return f'set "{label}" to {value}'

    def rewrite_bare(match: re.Match[str]) -> str:
        found = field(match.group(0))
        if found is None:
            return match.group(0)
        note(found[0])
        return f'"{found[1]}"'

    def rewrite_write(match: re.Match[str]) -> str:  # ``write --control MODEL=IMAGE[,...]``: CLI syntax
        found = field(match.group(1))
        if found is None:
            return match.group(0)
        note(found[0])
        if found[0] == "control":
            return "fill in the ControlNet unit's fields (model, image, preprocessor)"
        return f'set "{found[1]}"'

    def rewrite_file(match: re.Match[str]) -> str:  # ``(--model X.pth)``: a kind of file in a field
        found = field(match.group(1))
        if found is None:
            return match.group(0)
        note(found[0])
        value = match.group(2)
        kind = f"a {value[value.index('.') :]} file" if re.fullmatch(r"[A-Z]+\.\w+", value) else value
        return f'{kind} in "{found[1]}"'

    for pattern, words in _DEBUG:
        message = pattern.sub(words, message)
    text = _WRITE.sub(rewrite_write, _CLI_ONLY.sub("", message))
    text = _FILE_VALUE.sub(rewrite_file, text)
    text = _PASS.sub(rewrite_pass, text)
    text = re.sub(r" or (--[a-z][a-z0-9-]*) ([A-Z][A-Z0-9_,.:]*)", lambda m: _or_option(m, field, note), text)
    text = _OPTION.sub(rewrite_bare, text)
    return text, fields


def _or_option(
    match: re.Match[str],
    field: Callable[[str], tuple[str, str] | None],
    note: Callable[[str], None],
) -> str:
    """``... or --extend L,R,T,B`` -> ``... or set "extend" to L,R,T,B``."""
    found = field(match.group(1))
    if found is None:
        return match.group(0)
    note(found[0])
    return f' or set "{found[1]}" to {match.group(2)}'


#: How a field to fix is marked: a border on the field itself (an ID selector, so the widgets inside a
#: composite field, a ControlNet unit's every box, are not all outlined with it).
OUTLINE = "border: 2px solid #d9480f;"


def outline_targets(widget: Any) -> list[Any]:
    """The widgets that show a field's outline: a file field's text box, a ControlNet editor's unit boxes."""
    from difftool.gui.control_units import ControlUnitsField
    from difftool.gui.form import PathField

    if isinstance(widget, PathField):
        return [widget.edit]
    if isinstance(widget, ControlUnitsField):
        return list(widget.boxes) or [widget]
    return [widget]


def outline(widget: Any) -> None:
    """Outline ``widget`` until the user edits it (the outline marks a problem, not a field once wrong)."""
    if not widget.objectName():
        widget.setObjectName("outlined")
    widget.setStyleSheet(f"#{widget.objectName()} {{ {OUTLINE} }}")
    if not widget.property("outline-watched"):
        widget.setProperty("outline-watched", True)
        for signal in _changed(widget):
            signal.connect(lambda *_, w=widget: w.setStyleSheet(""))


def _changed(widget: Any) -> list[Any]:
    """The signals that say the user changed ``widget``'s value (a ControlNet unit: any of its fields)."""
    from PySide6.QtWidgets import QAbstractButton, QAbstractSpinBox, QComboBox, QGroupBox, QLineEdit, QPlainTextEdit

    if isinstance(widget, QAbstractSpinBox):
        return [getattr(widget, "valueChanged", widget.editingFinished)]
    if isinstance(widget, QComboBox):
        return [widget.currentTextChanged]
    if isinstance(widget, (QLineEdit, QPlainTextEdit)):
        return [widget.textChanged]
    if isinstance(widget, QAbstractButton):
        return [widget.toggled]
    if isinstance(widget, QGroupBox):
        fields = widget.findChildren(QAbstractSpinBox) + widget.findChildren(QComboBox)
        return [signal for child in fields + widget.findChildren(QLineEdit) for signal in _changed(child)]
    return []
