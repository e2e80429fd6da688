"""A parameter form generated from a task's declared parameters."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QWidget,
)

from difftool.core.task import Param, Task

DEFAULT_CHOICE = "(default)"


def default_label(param: Param, longest: int = 0) -> str:
    """What an unset field reads: "(default: 4, or a community model's own scale)" when the help says which
    (at most ``longest`` characters, if given: a spin box is as wide as its text; the tooltip has it all)."""
    found = re.search(r"\(?default:? ([^)]*)\)?", param.help or "")
    label = f"(default: {found.group(1).strip()})" if found else DEFAULT_CHOICE
    return DEFAULT_CHOICE if longest and len(label) > longest else label


class PromptEdit(QPlainTextEdit):
    """A multi-line text field in a form: Tab moves to the next field, as in every other field; Ctrl+Tab
    types a tab."""

    def __init__(self) -> None:
        super().__init__()
        self.setTabChangesFocus(True)

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt's name
        if event.key() == Qt.Key.Key_Tab and event.modifiers() & Qt.KeyboardModifier.ControlModifier:
            self.insertPlainText("\t")
            return
        super().keyPressEvent(event)


class PathField(QWidget):
    """A line edit with a Browse button."""

    def __init__(self, param: Param) -> None:
        super().__init__()
        self.edit = QLineEdit()
        if param.type == "mask":  # painting it is the other way: a mask is not "optional" to inpaint
            self.edit.setPlaceholderText("painted, or a mask file")
        else:
            self.edit.setPlaceholderText("required" if param.required else "optional")
        self.edit.setMinimumWidth(40)
        button = QPushButton("Browse…")
        button.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)  # never truncated
        button.clicked.connect(self._browse)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit)
        layout.addWidget(button)
        self.kind = param.type

    def _browse(self) -> None:
        pattern = "Images (*.png *.jpg *.jpeg *.webp *.tif *.tiff *.bmp)" if self.kind in ("image", "mask") else "*"
        path, _ = QFileDialog.getOpenFileName(self, "Choose a file", "", pattern)
        if path:
            self.edit.setText(path)

    def text(self) -> str:
        return self.edit.text()


class ParamForm(QWidget):
    """One widget per declared parameter of ``task`` (or anything with ``params``: a backend's options).

    :meth:`values` gives what :func:`difftool.app.api.run` takes. ``editors`` build a parameter's own widget
    (ControlNet units) by name; such a widget has ``value()``, ``set_value(value)`` and ``reset()``.
    """

    def __init__(
        self,
        task: Task,
        choices: dict[str, tuple[str, ...]],
        editors: dict[str, Callable[[Param], QWidget]] | None = None,
    ) -> None:
        super().__init__()
        self.task = task
        self.widgets: dict[str, QWidget] = {}
        editors = editors or {}
        layout = QFormLayout(self)
        layout.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)  # narrow panel: field under its label
        for param in task.params:
            make = editors.get(param.name)
            widget = make(param) if make else self._widget(param, choices.get(param.name, param.choices))
            tip = param.help + (
                f" (range {param.range_text()})" if param.min is not None or param.max is not None else ""
            )
            widget.setToolTip(tip)
            widget.setObjectName(param.name)
            self.widgets[param.name] = widget
            if isinstance(widget, QPlainTextEdit):  # four lines at least, eight at most: the form scrolls
                widget.setMinimumHeight(widget.fontMetrics().lineSpacing() * 4 + 12)
                widget.setMaximumHeight(widget.fontMetrics().lineSpacing() * 8 + 12)
            if isinstance(widget, QPlainTextEdit) or make:  # prompts, ControlNet units: the whole width
                layout.addRow(QLabel(param.name.replace("_", " ")))
                layout.addRow(widget)
            else:
                layout.addRow(param.name.replace("_", " "), widget)
        self.reset()

    @staticmethod
    def _widget(param: Param, choices: tuple[str, ...]) -> QWidget:
        if param.type == "int":
            box = QSpinBox()
            box.setRange(
                int(param.min if param.min is not None else -(2**31)),
                int(param.max if param.max is not None else 2**31 - 1),
            )
            if param.default is None:
                box.setSpecialValueText(default_label(param, 22))
                box.setMinimum(box.minimum() - 1)
            return box
        if param.type == "float":
            box = QDoubleSpinBox()
            box.setDecimals(3)
            box.setSingleStep(0.05)
            box.setRange(param.min if param.min is not None else -1e9, param.max if param.max is not None else 1e9)
            if param.default is None:  # one step below the range reads "(default)", as for integers
                box.setSpecialValueText(default_label(param, 22))
                box.setMinimum(box.minimum() - box.singleStep())
            return box
        if param.type == "bool":
            return QCheckBox()
        if param.type == "choice":
            combo = QComboBox()
            # A long entry ("(default: 4, or a community model's own scale)") must not widen the panel.
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(10)
            if param.default is None:
                combo.addItem(default_label(param))
            combo.addItems([str(c) for c in choices])
            return combo
        if param.type in ("image", "mask", "path"):
            return PathField(param)
        return PromptEdit() if param.multiline else QLineEdit()

    def reset(self, names: Collection[str] | None = None) -> None:
        """Restore the declared defaults (of ``names`` only, if given)."""
        for param in self.task.params:
            if names is not None and param.name not in names:
                continue
            widget, default = self.widgets[param.name], _default(param)
            if _is_editor(widget):
                widget.reset()  # type: ignore[attr-defined]
            elif isinstance(widget, QSpinBox):
                widget.setValue(widget.minimum() if default is None else int(default))
            elif isinstance(widget, QDoubleSpinBox):
                widget.setValue(widget.minimum() if default is None else float(default))
            elif isinstance(widget, QCheckBox):
                widget.setChecked(bool(default))
            elif isinstance(widget, QComboBox):
                if default is None:
                    widget.setCurrentIndex(0)  # "(default: ...)"
                else:
                    widget.setCurrentText(str(default))
            elif isinstance(widget, PathField):
                widget.edit.setText(str(default or ""))
            elif isinstance(widget, QPlainTextEdit):
                widget.setPlainText(str(default or ""))
            elif isinstance(widget, QLineEdit):
                widget.setText(str(default or ""))

    def set_values(self, values: dict[str, Any]) -> None:
        """Fill the form from a record (``reuse parameters``); unknown keys are ignored."""
        for name, value in values.items():
            widget = self.widgets.get(name)
            if widget is None or value is None:
                continue
            if _is_editor(widget):
                widget.set_value(value)  # type: ignore[attr-defined]
            elif isinstance(widget, QSpinBox):
                widget.setValue(int(value))
            elif isinstance(widget, QDoubleSpinBox):
                widget.setValue(float(value))
            elif isinstance(widget, QCheckBox):
                widget.setChecked(str(value).lower() in ("1", "true", "yes"))
            elif isinstance(widget, QComboBox):
                widget.setCurrentText(str(value))
            elif isinstance(widget, QPlainTextEdit):  # a multiple parameter's values: one per line
                widget.setPlainText("\n".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
            elif isinstance(widget, (QLineEdit, PathField)):
                (widget.edit if isinstance(widget, PathField) else widget).setText(str(value))

    def values(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for param in self.task.params:
            widget = self.widgets[param.name]
            if _is_editor(widget):
                value: Any = widget.value()  # type: ignore[attr-defined]
            elif isinstance(widget, QSpinBox):
                value = None if widget.value() == widget.minimum() and param.default is None else widget.value()
            elif isinstance(widget, QDoubleSpinBox):
                value = None if widget.value() == widget.minimum() and param.default is None else widget.value()
            elif isinstance(widget, QCheckBox):
                value = widget.isChecked()
            elif isinstance(widget, QComboBox):
                unset = param.default is None and widget.currentIndex() == 0  # the "(default: ...)" entry
                value = None if unset else widget.currentText()
            elif isinstance(widget, PathField):
                value = widget.text() or None
            elif isinstance(widget, QPlainTextEdit):
                value = widget.toPlainText() or (None if param.default is None else "")
            else:
                value = widget.text() or (None if param.default is None else "")
            if value is not None:
                out[param.name] = value
        return out


def _is_editor(widget: QWidget) -> bool:
    return hasattr(widget, "set_value")  # Qt's own widgets spell it setValue


def _default(param: Param) -> Any:
    """The value a fresh form shows: the declared default, or a backend option's environment default."""
    from difftool.core.errors import ParameterError

    if not param.env:
        return param.default
    try:
        return param.validate(param.effective_default())
    except ParameterError:  # a bad variable is reported when the run is checked; show the declared default
        return param.default
