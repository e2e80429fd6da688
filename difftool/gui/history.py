"""Finished jobs as a strip of thumbnails: the selected one is the result the window shows, saves, reuses."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QPoint, QSize, Qt, Signal
from PySide6.QtGui import QIcon, QPixmap
from PySide6.QtWidgets import QListWidget, QListWidgetItem, QMenu

from difftool.gui.convert import pil_to_qimage

THUMBNAIL = 96
#: Record keys the tooltip shows in its own lines (or not at all).
_OWN_LINES = ("task", "model", "seed", "backend", "device", "dtype", "precision", "difftool_version", "artifact")
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def describe(record: dict[str, Any], title: str) -> str:
    """A result's parameters for its tooltip; what was asked and what ran are told apart, never contradict."""
    lines = [title]
    if record.get("model"):
        lines.append(f"model: {record['model']}")
    lines.append(f"seed: {record.get('seed')}")
    lines += [f"{k.replace('_', ' ')}: {plain(v)}" for k, v in record.items() if k not in _OWN_LINES and plain(v)]
    lines.append(f"backend: {record.get('backend', 'torch')} on {record.get('device', 'cpu')}")
    asked, ran = record.get("dtype"), _SHORT.get(str(record.get("precision")), record.get("precision"))
    if ran and asked and ran != asked:  # an ONNX graph runs fp32 when bf16 was asked (no bf16 kernels)
        lines.append(f"precision: {ran} (asked {asked}; the {record.get('backend')} backend ran the model in {ran})")
    elif ran or asked:
        lines.append(f"precision: {ran or asked}")
    return "\n".join(lines)


def plain(value: Any) -> str:
    """A record's value as an artist reads it: lists one after another, settings as ``name value``, nothing
    for an empty one (never Python's ``()`` or ``{'provider': 'auto'}``)."""
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {plain(v)}" for k, v in value.items() if plain(v))
    if isinstance(value, (list, tuple)):
        return "; ".join(text for text in (plain(v) for v in value) if text)
    if value is None:
        return ""
    return str(value)


class HistoryStrip(QListWidget):
    """Thumbnails of finished jobs, newest last; :meth:`selected_job` is the one the window acts on.

    A/B across results: a right click on a thumbnail offers to compare against it (``compare_with``
    emits that job, or ``None`` to go back to before | after); the window then sets every result it
    shows against that one with the divider (two seeds, two models, side by side).
    """

    compare_with = Signal(object)

    def __init__(self) -> None:
        super().__init__()
        self.jobs: list[Any] = []
        self.reference: Any = None  # the job results are compared against (None: each result's input)
        self.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.customContextMenuRequested.connect(self._menu)
        self.setViewMode(QListWidget.ViewMode.IconMode)
        self.setIconSize(QSize(THUMBNAIL, THUMBNAIL))
        self.setMaximumHeight(THUMBNAIL + 34)
        # One row that scrolls sideways: a wrapped second row was cut off by the height, and its captions
        # were left drawn under the first row's thumbnails.
        self.setFlow(QListWidget.Flow.LeftToRight)
        self.setWrapping(False)
        self.setMovement(QListWidget.Movement.Static)
        self.setResizeMode(QListWidget.ResizeMode.Adjust)
        self.setUniformItemSizes(True)
        self.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        # Selection is a frame around the thumbnail, not a tint over it (a tint looks like a colour shift).
        self.setStyleSheet(
            "QListWidget::item:selected { background: transparent; color: palette(text);"
            " border: 2px solid palette(highlight); }"
        )

    def add(self, job: Any) -> QListWidgetItem:
        image = job.result.image
        pixmap = QPixmap.fromImage(
            pil_to_qimage(image).scaled(THUMBNAIL, THUMBNAIL, Qt.AspectRatioMode.KeepAspectRatio)
        )
        icon = QIcon()
        for mode in (QIcon.Mode.Normal, QIcon.Mode.Selected, QIcon.Mode.Active):
            icon.addPixmap(pixmap, mode)  # the same pixels selected or not
        item = QListWidgetItem(icon, f"{job.task} #{job.id}")
        self.jobs.append(job)
        item.setData(Qt.ItemDataRole.UserRole, len(self.jobs) - 1)
        item.setToolTip(describe(job.result.record, f"{job.task} #{job.id}, {image.width}×{image.height}"))
        self.addItem(item)
        self.setCurrentItem(item)
        self.scrollToItem(item)  # the newest result in view
        return item

    def compare_menu(self, item: QListWidgetItem | None) -> QMenu:
        """The thumbnail's menu: compare the shown results against it (A/B), or stop comparing."""
        menu = QMenu(self)
        if item is not None:
            job = self.job_of(item)
            menu.addAction(f"Compare results against #{job.id} (A/B)", lambda: self.compare_with.emit(job))
        if self.reference is not None:
            menu.addAction(f"Stop comparing against #{self.reference.id}", lambda: self.compare_with.emit(None))
        return menu

    def _menu(self, point: QPoint) -> None:
        menu = self.compare_menu(self.itemAt(point))
        if not menu.isEmpty():
            menu.exec(self.viewport().mapToGlobal(point))

    def job_of(self, item: QListWidgetItem) -> Any:
        return self.jobs[int(item.data(Qt.ItemDataRole.UserRole))]

    def selected_job(self) -> Any:
        item = self.currentItem()
        return self.job_of(item) if item is not None else None
