"""The image canvas: zoom and pan, a before/after compare view with a draggable divider, mask painting."""

from __future__ import annotations

from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QImage, QMouseEvent, QPainter, QPaintEvent, QPen, QRadialGradient, QWheelEvent
from PySide6.QtWidgets import QWidget

SOURCE = object()  # set_result's default "before": the source on the canvas


class MaskLayer:
    """A grayscale mask the size of the image (255 = repaint), with brush strokes and undo/redo."""

    def __init__(self, width: int, height: int) -> None:
        self.image = QImage(width, height, QImage.Format.Format_Grayscale8)
        self.image.fill(0)
        self.undo_stack: list[QImage] = []
        self.redo_stack: list[QImage] = []
        self.brush_size = 32
        self.hardness = 0.8
        self.erase = False

    def checkpoint(self) -> None:
        self.undo_stack.append(self.image.copy())
        self.undo_stack = self.undo_stack[-50:]
        self.redo_stack.clear()

    def stroke(self, start: QPointF, end: QPointF) -> None:
        painter = QPainter(self.image)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, self.hardness < 1.0)
        value = 0 if self.erase else 255
        radius = self.brush_size / 2
        steps = max(1, int((end - start).manhattanLength() / max(1.0, radius / 3)))
        painter.setPen(Qt.PenStyle.NoPen)
        for i in range(steps + 1):
            point = start + (end - start) * (i / steps)
            if self.hardness >= 1.0:
                painter.setBrush(QColor(value, value, value))
            else:
                gradient = QRadialGradient(point, radius)
                gradient.setColorAt(0.0, QColor(value, value, value, 255))
                gradient.setColorAt(self.hardness, QColor(value, value, value, 255))
                gradient.setColorAt(1.0, QColor(value, value, value, 0))
                painter.setBrush(gradient)
            painter.drawEllipse(point, radius, radius)
        painter.end()

    def _apply(self, change) -> None:  # noqa: ANN001 - a small local callback
        self.checkpoint()
        change()

    def clear(self) -> None:
        self._apply(lambda: self.image.fill(0))

    def fill(self) -> None:
        self._apply(lambda: self.image.fill(255))

    def invert(self) -> None:
        self._apply(lambda: self.image.invertPixels())

    def undo(self) -> None:
        if self.undo_stack:
            self.redo_stack.append(self.image)
            self.image = self.undo_stack.pop()

    def redo(self) -> None:
        if self.redo_stack:
            self.undo_stack.append(self.image)
            self.image = self.redo_stack.pop()

    def load(self, image: QImage) -> None:
        self._apply(
            lambda: setattr(
                self,
                "image",
                image.convertToFormat(QImage.Format.Format_Grayscale8).scaled(self.image.width(), self.image.height()),
            )
        )


class Canvas(QWidget):
    """Shows ``after`` (or ``before``) with zoom/pan.

    In compare mode a divider splits the view: ``before`` left of it, ``after`` right of it; ``split`` is
    the divider's place across the image, 0 (all after) to 1 (all before). The left button drags it.
    """

    hovered = Signal(int, int)  # image pixel under the cursor
    zoomed = Signal(float)
    source_shown = Signal()  # the source replaced the result on screen (to paint on it)

    def __init__(self) -> None:
        super().__init__()
        self.before: QImage | None = None
        self.after: QImage | None = None
        self.mask: MaskLayer | None = None
        self.mask_opacity = 0.5
        self.mask_color = QColor(255, 40, 40)
        self.painting = False
        self.brush_screen = 32  # the brush's diameter in screen pixels, whatever the zoom
        self.compare = False
        self.compare_with: QImage | None = None  # the "before" of the result on screen
        #: The divider's captions, left and right: before | after, or two results (``#3 generate`` | ``#5``).
        self.compare_labels = ("before", "after")
        self.split = 0.5
        self._dragging_split = False
        self._pointer: QPointF | None = None
        self.scale = 1.0
        self.offset = QPointF(0, 0)
        self._drag: QPointF | None = None
        self._last_paint: QPointF | None = None
        self.fitted = True  # keep fitting on resize until the user zooms
        self.setMouseTracking(True)
        self.setMinimumSize(320, 240)

    # --- content ------------------------------------------------------------------------------
    def set_image(self, image: QImage) -> None:
        """A new source image: resets the result, the mask and the view."""
        self.before, self.after, self.compare_with = image, None, None
        self.mask = MaskLayer(image.width(), image.height())
        self.fit()

    def set_result(self, image: QImage, before: QImage | None | object = SOURCE) -> None:
        """Show a result (or preview); the compare view sets it against ``before`` (default: the source;
        ``None``: nothing to compare, e.g. a generated image)."""
        previous = self.shown()
        self.after = image
        self.compare_with = self.before if before is SOURCE else before  # type: ignore[assignment]
        if self.fitted:
            self.fit()  # a 4x result keeps filling the view instead of zooming in 4x
        else:
            self._keep_view(previous, image)
        self.update()

    def show_source(self) -> None:
        """Show the source instead of the result (to paint on it), where the result was on screen."""
        if self.after is not None:
            self._keep_view(self.after, self.before)
            self.after = None
            self.source_shown.emit()
            self.update()

    def _keep_view(self, old: QImage | None, new: QImage | None) -> None:
        """The new image takes the old one's place on screen: same rectangle, so the same centre and
        apparent size (a 160x120 source replacing its 320x240 result is shown at twice the zoom)."""
        if old is None or new is None or old.width() == 0 or new.width() == 0 or old.width() == new.width():
            return
        self.scale *= old.width() / new.width()
        self.zoomed.emit(self.scale)

    def shown(self) -> QImage | None:
        return self.after or self.before

    # --- view ---------------------------------------------------------------------------------
    def resizeEvent(self, event: object) -> None:  # noqa: N802 - Qt's name
        if self.fitted:
            self.fit()

    def fit(self) -> None:
        self.fitted = True
        image = self.shown()
        if image is None or image.width() == 0:
            return
        self.scale = min(self.width() / image.width(), self.height() / image.height())
        self.offset = QPointF(
            (self.width() - image.width() * self.scale) / 2, (self.height() - image.height() * self.scale) / 2
        )
        self.zoomed.emit(self.scale)
        self.update()

    def actual_size(self) -> None:
        self.fitted = False
        self.scale = 1.0
        self.offset = QPointF(0, 0)
        self.zoomed.emit(self.scale)
        self.update()

    def to_image(self, point: QPointF) -> QPointF:
        return (point - self.offset) / self.scale

    def wheelEvent(self, event: QWheelEvent) -> None:  # noqa: N802 - Qt's name
        self.fitted = False
        factor = 1.25 if event.angleDelta().y() > 0 else 0.8
        anchor = event.position()
        before = self.to_image(anchor)
        self.scale = max(0.02, min(64.0, self.scale * factor))
        self.offset = anchor - before * self.scale
        self.zoomed.emit(self.scale)
        self.update()

    # --- mouse: pan with the right/middle button (or left when not painting), paint with the left --
    def brush_in_image(self) -> float:
        """The brush's diameter in image pixels: what :attr:`brush_screen` covers at this zoom."""
        return max(1.0, self.brush_screen / self.scale)

    def comparing(self) -> bool:
        return self.compare and self.compare_with is not None and self.after is not None and not self.painting

    def set_split(self, value: float) -> None:
        self.split = min(1.0, max(0.0, value))
        self.update()

    def _image_rect(self, image: QImage) -> QRectF:
        return QRectF(self.offset.x(), self.offset.y(), image.width() * self.scale, image.height() * self.scale)

    def _split_at(self, x: float) -> None:
        target = self._image_rect(self.after)  # type: ignore[arg-type]
        self.set_split((x - target.left()) / max(1.0, target.width()))

    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        if event.button() == Qt.MouseButton.LeftButton and self.comparing():
            self._dragging_split = True
            self._split_at(event.position().x())
        elif event.button() == Qt.MouseButton.LeftButton and self.painting and self.mask is not None:
            self.mask.brush_size = self.brush_in_image()
            self.mask.checkpoint()
            self._last_paint = self.to_image(event.position())
            self.mask.stroke(self._last_paint, self._last_paint)
            self.update()
        else:
            self._drag = event.position()

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        point = self.to_image(event.position())
        self.hovered.emit(int(point.x()), int(point.y()))
        self._pointer = event.position()
        if self.painting:
            self.update()  # the brush outline follows the pointer
        if self._dragging_split:
            self._split_at(event.position().x())
        elif self._last_paint is not None and self.mask is not None:
            self.mask.stroke(self._last_paint, point)
            self._last_paint = point
            self.update()
        elif self._drag is not None:
            self.offset += event.position() - self._drag
            self._drag = event.position()
            self.update()

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        self._drag = self._last_paint = None
        self._dragging_split = False

    def leaveEvent(self, event: object) -> None:  # noqa: N802
        self._pointer = None
        self.update()

    # --- drawing ------------------------------------------------------------------------------
    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802
        painter = QPainter(self)
        painter.fillRect(self.rect(), self.palette().window())
        image = self.shown()
        if image is None:
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "Open, drop or paste an image")
            return
        target = self._image_rect(image)
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, self.scale < 1.0)
        painter.drawImage(target, image)
        if self.comparing():
            self._paint_compare(painter, target)
        if self.mask is not None and self.after is None:
            overlay = QImage(self.mask.image.size(), QImage.Format.Format_ARGB32)
            overlay.fill(self.mask_color)
            overlay.setAlphaChannel(self.mask.image)
            painter.setOpacity(self.mask_opacity)
            painter.drawImage(target, overlay)
            painter.setOpacity(1.0)
        if self.painting and self._pointer is not None:  # the brush as it will paint, at this zoom
            radius = self.brush_screen / 2
            for color, width in ((QColor(0, 0, 0), 3), (QColor(255, 255, 255), 1)):
                painter.setPen(QPen(color, width))
                painter.setBrush(Qt.BrushStyle.NoBrush)
                painter.drawEllipse(self._pointer, radius, radius)
        painter.end()

    def _paint_compare(self, painter: QPainter, target: QRectF) -> None:
        """``before`` (scaled to the result's size) left of the divider, labels on each side."""
        x = target.left() + target.width() * self.split
        painter.save()
        painter.setClipRect(QRectF(target.left(), target.top(), x - target.left(), target.height()))
        painter.drawImage(target, self.compare_with)  # type: ignore[arg-type]
        painter.restore()
        painter.setPen(QPen(QColor(255, 255, 255), 2))
        painter.drawLine(QPointF(x, target.top()), QPointF(x, target.bottom()))
        painter.setBrush(QColor(255, 255, 255))
        painter.drawEllipse(QPointF(x, target.center().y()), 6, 6)  # the handle
        top = max(target.top(), 0) + 6
        left_text, right_text = self.compare_labels
        for text, right, show in ((left_text, False, self.split > 0.02), (right_text, True, self.split < 0.98)):
            if not show:
                continue
            width = painter.fontMetrics().horizontalAdvance(text) + 12
            left = min(x, self.width()) - width - 6 if not right else max(x, 0) + 6
            box = QRectF(left, top, width, painter.fontMetrics().height() + 6)
            painter.fillRect(box, QColor(0, 0, 0, 150))
            painter.setPen(QColor(255, 255, 255))
            painter.drawText(box, Qt.AlignmentFlag.AlignCenter, text)
