"""The ControlNet units editor: one box per unit (model, control image, preprocessor and its options,
weight, start/end, guess mode) with a preview of what the preprocessor makes of the image.

Its value is the list of ``--control`` strings the CLI and API take, so a run, a saved record and a PNG's
metadata all carry the same text. The preview runs the registered preprocessor itself (no model is
loaded), on the unit's image or, when it names none, on the image open in the window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from PySide6.QtCore import Qt
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from difftool.core.errors import DifftoolError
from difftool.core.task import Param, RegistryView
from difftool.gui.form import PathField
from difftool.plugins.builtin.sd.control import RESIZE_MODES, parse_unit, preprocess, split_unit

#: The preview's longest side: preprocessors run on a reduced copy, so a large photo previews at once.
PREVIEW_SIDE = 384
_KNOWN = ("model", "image", "pre", "weight", "start", "end", "guess", "resize")


def is_control_param(param: Param) -> bool:
    """Whether ``param`` holds ControlNet units (the form then shows this editor)."""
    return param.multiple and param.parse is parse_unit


class ControlUnitBox(QGroupBox):
    """One unit's fields, its preview and a Remove button."""

    def __init__(self, owner: ControlUnitsField, number: int) -> None:
        super().__init__(f"ControlNet {number}")
        self.owner = owner
        self.model = QComboBox()
        self.model.setEditable(True)  # a listed name, or a file or folder typed in
        # Long file names must not widen the narrow task panel (it never scrolls sideways).
        self.model.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model.setMinimumContentsLength(8)
        self.model.addItems(owner.models)
        self.model.setCurrentText("")
        self.model.lineEdit().setPlaceholderText("a listed name, file or folder")  # its label says "model"
        self.image = PathField(Param("image", "image"))
        self.image.edit.setPlaceholderText("empty: the input image" if owner.takes_input else "empty: the open image")
        self.pre = QComboBox()
        for name, entry in sorted(owner.preprocessors.items()):
            self.pre.addItem(name)
            self.pre.setItemData(self.pre.count() - 1, entry.summary, Qt.ItemDataRole.ToolTipRole)
        self.pre.setCurrentText("none")
        self.options = QLineEdit()
        self.pre.currentTextChanged.connect(self._show_options)
        self.weight, self.start, self.end = _spin(1.0, 2.0), _spin(0.0, 1.0), _spin(1.0, 1.0)
        self.guess = QCheckBox("guess mode")
        self.resize = QComboBox()
        for mode, label in RESIZE_MODES.items():
            self.resize.addItem(label, mode)
        self.preview_label = QLabel()
        self.preview_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.preview_label.setWordWrap(True)
        self.preview_array: np.ndarray | None = None
        preview, remove = QPushButton("Preview"), QPushButton("Remove")
        preview.clicked.connect(self.show_preview)
        remove.clicked.connect(lambda: owner.remove(self))
        span = QHBoxLayout()
        for label, box in (("start", self.start), ("end", self.end)):
            span.addWidget(QLabel(label))
            span.addWidget(box)
        buttons = QHBoxLayout()
        buttons.addWidget(preview)
        buttons.addWidget(remove)
        layout = QFormLayout(self)
        layout.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        for label, field in (
            ("model", self.model),
            ("image", self.image),
            ("preprocessor", self.pre),
            ("options", self.options),
            ("weight", self.weight),
            ("fit", self.resize),
        ):
            layout.addRow(label, field)
        layout.addRow("steps", span)
        layout.addRow(self.guess)
        layout.addRow(buttons)
        layout.addRow(self.preview_label)
        self._show_options(self.pre.currentText())

    def _show_options(self, name: str) -> None:
        entry = self.owner.preprocessors.get(name)
        declared = ", ".join(f"{p.name}={p.default:g}" for p in entry.options) if entry else ""
        self.options.setPlaceholderText(declared or "no options")
        self.options.setEnabled(bool(declared) or bool(self.options.text()))

    def text(self) -> str | None:
        """The unit as ``--control`` takes it; ``None`` while no model is named (Run refuses it: see
        :meth:`ControlUnitsField.problems`)."""
        model = self.model.currentText().strip()
        return self._text(model, self.owner.control_image(self)) if model else None

    def _text(self, model: str, image: str | None = None) -> str:
        image = self.image.text().strip() if image is None else image
        head = f"{model}={image}" if image else model
        parts = [head, f"pre={self.pre.currentText()}", f"weight={self.weight.value():g}"]
        parts += [f"start={self.start.value():g}", f"end={self.end.value():g}"]
        parts += ["guess=1"] if self.guess.isChecked() else []
        parts += [f"resize={self.resize.currentData()}"] if self.resize.currentData() != "crop" else []
        options = [part.strip() for part in self.options.text().replace(";", ",").split(",") if part.strip()]
        return ",".join(parts + options)

    def set_text(self, text: str) -> None:
        """Show a unit's string form (as written, not checked: an image that has gone stays visible)."""
        fields = split_unit(text)
        self.model.setCurrentText(fields["model"])
        self.image.edit.setText(fields["image"] or "")
        self.pre.setCurrentText(str(fields.get("pre") or "none"))
        for key, box in (("weight", self.weight), ("start", self.start), ("end", self.end)):
            if key in fields:
                box.setValue(float(fields[key]))
        self.guess.setChecked(str(fields.get("guess", "")).lower() in ("1", "true", "yes"))
        self.resize.setCurrentIndex(max(0, self.resize.findData(fields.get("resize") or "crop")))
        self.options.setText(",".join(f"{k}={v}" for k, v in fields.items() if k not in _KNOWN))
        self._show_options(self.pre.currentText())

    def show_preview(self) -> None:
        """Run the preprocessor on the unit's image and show the result (or the one-line problem)."""
        try:
            self.preview_array = self.owner.preview(self)
        except (DifftoolError, OSError, ValueError) as error:
            self.preview_array = None
            self.preview_label.setPixmap(QPixmap())
            self.preview_label.setText(f"⚠ {error}")
            return
        pixels = np.ascontiguousarray((np.clip(self.preview_array, 0, 1) * 255).round().astype(np.uint8))
        height, width = pixels.shape[:2]
        qimage = QImage(pixels.data, width, height, 3 * width, QImage.Format.Format_RGB888).copy()
        self.preview_label.setText("")
        self.preview_label.setPixmap(QPixmap.fromImage(qimage).scaledToWidth(min(width, 240)))


class ControlUnitsField(QWidget):
    """Any number of :class:`ControlUnitBox` es and an Add button; :meth:`value` is what the task takes.

    ``models``: the listed ControlNets' names; ``registry``: where the preprocessors come from;
    ``source``: the image open in the window (PIL), for units that name no image of their own.
    """

    def __init__(
        self,
        models: Sequence[str],
        registry: RegistryView,
        source: Callable[[], Any] | None = None,
        takes_input: bool = True,
        source_path: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self.models, self.registry, self.preprocessors = list(models), registry, dict(registry.preprocessors)
        self.source = source or (lambda: None)
        #: Whether the task has an input image (style, inpaint: an empty image field means it); generate has
        #: none, so an empty field means the image open in the window, which must then be a file.
        self.takes_input = takes_input
        self.source_path = source_path or (lambda: None)
        self.on_change: Callable[[], None] = lambda: None  # units added or removed (the panel's Tab order)
        self.boxes: list[ControlUnitBox] = []
        self.units_layout = QVBoxLayout()
        self.units_layout.setContentsMargins(0, 0, 0, 0)
        add = QPushButton("Add ControlNet")
        add.clicked.connect(self.add)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(self.units_layout)
        layout.addWidget(add)

    def add(self) -> ControlUnitBox:
        box = ControlUnitBox(self, len(self.boxes) + 1)
        self.boxes.append(box)
        self.units_layout.addWidget(box)
        self.on_change()
        return box

    def remove(self, box: ControlUnitBox) -> None:
        self.boxes.remove(box)
        box.setParent(None)
        box.deleteLater()
        for number, other in enumerate(self.boxes, 1):
            other.setTitle(f"ControlNet {number}")
        self.on_change()

    def reset(self) -> None:
        for box in list(self.boxes):
            self.remove(box)

    def value(self) -> list[str] | None:
        texts = [text for text in (box.text() for box in self.boxes) if text]
        return texts or None

    def control_image(self, box: ControlUnitBox) -> str:
        """The unit's control image as the run gets it: its own file, else (a task without an input image)
        the file open in the window; empty for a task that uses its input image."""
        own = box.image.text().strip()
        if own or self.takes_input:
            return own
        path = self.source_path()
        return str(path) if path is not None and self.source() is not None else ""

    def problems(self) -> list[tuple[str, QWidget]]:
        """What Run must refuse, in the window's words, each with the field to fix (never a unit dropped)."""
        found: list[tuple[str, QWidget]] = []
        for number, box in enumerate(self.boxes, 1):
            if not box.model.currentText().strip():
                found.append(
                    (
                        f'ControlNet {number} has no model: choose one in its "model" field (a listed ControlNet, '
                        "or type a file or folder), or Remove the unit",
                        box.model,
                    )
                )
            elif not self.control_image(box) and not self.takes_input:
                found.append((self._no_image(number), box.image.edit))
        return found

    def _no_image(self, number: int) -> str:
        where = (
            "the image open in the window is not a file (pasted, or a result): save it and open the file"
            if self.source() is not None
            else "no image is open in the window"
        )
        return f'ControlNet {number} has no control image: {where}, or choose one in its "image" field'

    def set_value(self, value: Any) -> None:
        """Units from a record or a PNG: a list of strings, or one string with a unit per line."""
        lines = value if isinstance(value, (list, tuple)) else str(value).splitlines()
        self.reset()
        for line in lines:
            if str(line).strip():
                self.add().set_text(str(line))

    def preview(self, box: ControlUnitBox) -> np.ndarray:
        """``box``'s preprocessor on its image (or the window's), reduced to :data:`PREVIEW_SIDE`."""
        from difftool.core.images import open_image

        # The same checks as a run (a bad option fails here with the same words); no model is needed. The
        # image is the one the run will use: a task without an input image has only files to go on.
        number = self.boxes.index(box) + 1 if box in self.boxes else 1
        unit = parse_unit(box._text(box.model.currentText().strip() or "(preview)", self.control_image(box)))
        if unit.image is not None:
            image = open_image(unit.image).to_pil(keep_mode=False)
        elif not self.takes_input:
            raise ValueError(self._no_image(number))
        else:
            image = self.source()
            if image is None:
                raise ValueError(f'ControlNet {number} has no control image: open an image, or choose one in "image"')
        image = image.convert("RGB")
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
        rgb = np.asarray(image, dtype=np.float32) / 255.0
        return preprocess(self.registry, unit, rgb, None)


def _spin(default: float, top: float) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(0.0, top)
    box.setDecimals(2)
    box.setSingleStep(0.05)
    box.setValue(default)
    return box
