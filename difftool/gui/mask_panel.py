"""The mask tools: paint toggle, brush (screen pixels), hardness, eraser, overlay opacity and colour,
undo/redo/invert/clear/fill, load/save."""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QImage
from PySide6.QtWidgets import (
    QCheckBox,
    QColorDialog,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QPushButton,
    QSlider,
    QSpinBox,
    QWidget,
)

from difftool.core.images import save_image
from difftool.gui.canvas import Canvas
from difftool.gui.convert import qimage_to_pil


class MaskPanel(QWidget):
    """Paints the canvas's mask; :meth:`painted_mask` gives what was painted, pixel for pixel."""

    def __init__(self, canvas: Canvas, show_error: Callable[[str], None]) -> None:
        super().__init__()
        self.canvas, self.show_error = canvas, show_error
        layout = QFormLayout(self)
        self.paint_check = QCheckBox("paint mask")
        self.paint_check.toggled.connect(self._on_paint_toggled)
        self.brush_size = QSpinBox()
        self.brush_size.setRange(1, 512)
        self.brush_size.setValue(32)
        self.brush_size.setSuffix(" px on screen")
        self.brush_size.setToolTip(
            "the brush's diameter as you see it, whatever the zoom (its outline follows the pointer)"
        )
        self.hardness = QSlider(Qt.Orientation.Horizontal)
        self.hardness.setRange(0, 100)
        self.hardness.setValue(80)
        self.eraser = QCheckBox("eraser")
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(50)
        self.opacity.valueChanged.connect(self._on_opacity)
        self.color_button = QPushButton("Overlay colour…")
        self.color_button.clicked.connect(self.pick_color)
        self._show_color()
        self.brush_size.valueChanged.connect(self.sync_brush)
        self.hardness.valueChanged.connect(self.sync_brush)
        self.eraser.toggled.connect(self.sync_brush)
        layout.addRow(self.paint_check)
        layout.addRow("brush size", self.brush_size)
        layout.addRow("hardness", self.hardness)
        layout.addRow(self.eraser)
        layout.addRow("overlay", self.opacity)
        layout.addRow(self.color_button)
        row = QHBoxLayout()
        for text, slot in (
            ("Undo", "undo"),
            ("Redo", "redo"),
            ("Invert", "invert"),
            ("Clear", "clear"),
            ("Fill", "fill"),
        ):
            button = QPushButton(text)
            button.clicked.connect(lambda _=False, s=slot: self._mask_op(s))
            row.addWidget(button)
        layout.addRow(row)
        io = QHBoxLayout()
        load, save = QPushButton("Load mask…"), QPushButton("Save mask…")
        load.clicked.connect(self.load_mask)
        save.clicked.connect(self.save_mask)
        io.addWidget(load)
        io.addWidget(save)
        layout.addRow(io)
        self.setMaximumWidth(280)

    def _on_paint_toggled(self, on: bool) -> None:
        self.canvas.painting = on
        if on:
            self.canvas.show_source()  # paint on the source, where the result was on screen

    def sync_brush(self) -> None:
        self.canvas.brush_screen = self.brush_size.value()
        self.canvas.update()
        if self.canvas.mask is not None:
            self.canvas.mask.brush_size = self.canvas.brush_in_image()
            self.canvas.mask.hardness = self.hardness.value() / 100
            self.canvas.mask.erase = self.eraser.isChecked()

    def pick_color(self, color: QColor | None = None) -> None:
        """The overlay's colour (red is invisible on a red bike); asks with a dialog when not given."""
        if color is None:
            color = QColorDialog.getColor(self.canvas.mask_color, self, "Mask overlay colour")
        if color.isValid():
            self.canvas.mask_color = QColor(color)
            self._show_color()
            self.canvas.update()

    def _show_color(self) -> None:
        self.color_button.setStyleSheet(f"border-left: 14px solid {self.canvas.mask_color.name()};")

    def _on_opacity(self, value: int) -> None:
        self.canvas.mask_opacity = value / 100
        self.canvas.update()

    def _mask_op(self, name: str) -> None:
        if self.canvas.mask is not None:
            getattr(self.canvas.mask, name)()
            self.canvas.update()

    def painted_mask(self) -> Image.Image | None:
        """The painted mask as an ``L`` image the size of the source (``None`` if nothing is painted)."""
        mask = self.canvas.mask
        if mask is None:
            return None
        image = qimage_to_pil(mask.image)
        return image if image.getbbox() is not None else None

    def load_mask(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load mask", "", "Images (*.png *.jpg *.bmp *.tif)")
        if path and self.canvas.mask is not None:
            self.canvas.mask.load(QImage(path))
            self.canvas.update()

    def save_mask(self) -> None:
        mask = self.painted_mask()
        if mask is None:
            self.show_error("there is no painted mask to save")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save mask", "mask.png", "PNG (*.png)")
        if path:
            save_image(mask, path)
