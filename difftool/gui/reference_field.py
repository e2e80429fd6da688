"""The field of a repeatable image or path parameter (an IP-Adapter's ``reference``, a plugin's own): the chosen
images as thumbnails, image files or folders dropped on it or added by Add…/Folder…, and Clear.

The form shows it for any parameter declared ``multiple`` of type ``image`` or ``path`` (:func:`is_image_list`),
whatever its name. Every file is decoded before it is taken, as the window opens an image (a header's size
is checked against the pixel limit first), so a file that is no image is refused here, in one line under the
thumbnails, not when the job runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QDragEnterEvent, QDropEvent, QIcon, QPixmap
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from difftool.core.params import Param

#: A thumbnail's longest side (screen pixels).
THUMB_SIDE = 64
#: Thumbnails shown for a dropped folder (the run reads all its images; a few say what it holds).
FOLDER_THUMBS = 4
_FILTER = "Images (*.png *.jpg *.jpeg *.webp *.tif *.tiff *.bmp *.gif)"


def is_image_list(param: Param) -> bool:
    """Whether ``param`` takes several images or folders of them (the form then shows this field)."""
    return param.multiple and param.type in ("image", "path") and param.parse is None


def thumbnail(path: Path, side: int = THUMB_SIDE) -> QPixmap:
    """``path`` decoded as the window opens an image (bounded: the header's size is checked before decoding)
    and reduced to ``side``; an :class:`~difftool.core.errors.ImageError` for a file that is no image."""
    from difftool.core.images import open_image
    from difftool.gui.convert import pil_to_qimage

    image = open_image(path).to_pil()
    image.thumbnail((side, side))
    return QPixmap.fromImage(pil_to_qimage(image))


def folder_images(folder: Path) -> list[Path]:
    from difftool.app.batch import IMAGE_SUFFIXES

    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class ReferenceImagesField(QWidget):
    """Thumbnails of the chosen images (a folder shows its first few), Add…, Folder… and Clear; :meth:`value`
    is the list of files and folders, as ``--reference`` repeated takes them."""

    def __init__(self, param: Param) -> None:
        super().__init__()
        self.param = param
        self.paths: list[str] = []
        self.setAcceptDrops(True)
        self.thumbs = QListWidget()
        self.thumbs.setViewMode(QListView.ViewMode.IconMode)
        self.thumbs.setIconSize(QSize(THUMB_SIDE, THUMB_SIDE))
        self.thumbs.setFlow(QListView.Flow.LeftToRight)
        self.thumbs.setWrapping(False)  # one row that scrolls sideways: the panel keeps its height
        self.thumbs.setFixedHeight(THUMB_SIDE + 26)  # the icon and its name
        self.thumbs.setMovement(QListView.Movement.Static)
        self.thumbs.setAcceptDrops(False)  # a drop lands on the field (below), not the list's own handling
        self.thumbs.viewport().setAcceptDrops(False)
        self.empty = QLabel("drop images or a folder here, or Add…")
        self.empty.setEnabled(False)  # greyed, as a placeholder
        self.message = QLabel()
        self.message.setWordWrap(True)
        add, folder, clear = QPushButton("Add…"), QPushButton("Folder…"), QPushButton("Clear")
        add.clicked.connect(self._browse_files)
        folder.clicked.connect(self._browse_folder)
        clear.clicked.connect(self.reset)
        self.clear_button = clear
        buttons = QHBoxLayout()
        buttons.setContentsMargins(0, 0, 0, 0)
        for button in (add, folder, clear):
            buttons.addWidget(button)
        buttons.addStretch(1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.empty)
        layout.addWidget(self.thumbs)
        layout.addLayout(buttons)
        layout.addWidget(self.message)
        self._show()

    # --- the editor protocol of ParamForm -----------------------------------------------------
    def value(self) -> list[str] | None:
        return list(self.paths) or None

    def set_value(self, value: Any) -> None:
        """Show ``value`` (a list, or text with one path per line); files that are no image are refused."""
        values = value if isinstance(value, (list, tuple)) else str(value).splitlines()
        self.reset()
        self.add_paths(Path(str(v).strip()) for v in values if str(v).strip())

    def reset(self) -> None:
        self.paths.clear()
        self.thumbs.clear()
        self._say([])
        self._show()

    # --- adding -------------------------------------------------------------------------------
    def add_paths(self, paths: Iterable[Path]) -> list[str]:
        """Take each image file or folder of images in ``paths``; those refused are said, one line each,
        under the thumbnails. Returns the problems."""
        from difftool.core.errors import DifftoolError

        problems: list[str] = []
        for path in paths:
            try:
                self._add(Path(path).expanduser())
            except (DifftoolError, OSError) as error:
                problems.append(str(error))
        self._say(problems)
        self._show()
        return problems

    def _add(self, path: Path) -> None:
        from difftool.core.errors import ImageError

        if str(path) in self.paths:
            return
        if path.is_dir():
            files = folder_images(path)
            if not files:
                raise ImageError(f"{path.name} holds no images", "drop image files or a folder of them")
            pixmaps = [thumbnail(f) for f in files[:FOLDER_THUMBS]]  # a bad one is refused now, not mid-run
            names = [f"{path.name}/{f.name}" for f in files[:FOLDER_THUMBS]]
            if len(files) > FOLDER_THUMBS:
                names[-1] += f" (+{len(files) - FOLDER_THUMBS} more)"
        else:
            pixmaps, names = [thumbnail(path)], [path.name]  # no such file, a folder, no image: ImageError
        self.paths.append(str(path))
        for pixmap, name in zip(pixmaps, names, strict=True):
            item = QListWidgetItem(QIcon(pixmap), name)
            item.setToolTip(str(path))
            item.setData(Qt.ItemDataRole.UserRole, str(path))
            self.thumbs.addItem(item)

    def _say(self, problems: list[str]) -> None:
        self.message.setText("\n".join(f"⚠ {problem}" for problem in problems))
        self.message.setVisible(bool(problems))

    def _show(self) -> None:
        self.empty.setVisible(not self.paths)
        self.thumbs.setVisible(bool(self.paths))
        self.clear_button.setEnabled(bool(self.paths))

    def _browse_files(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, f"Choose {self.param.name} images", "", _FILTER)
        self.add_paths(Path(f) for f in files)

    def _browse_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, f"Choose a folder of {self.param.name} images")
        if folder:
            self.add_paths([Path(folder)])

    # --- drag and drop ------------------------------------------------------------------------
    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802 - Qt's name
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dragMoveEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802 - Qt's name
        """Dropped files and folders are added (the window's own drop, which opens an image, is not run)."""
        urls = event.mimeData().urls()
        local = [Path(url.toLocalFile()) for url in urls if url.isLocalFile()]
        event.acceptProposedAction()
        problems = self.add_paths(local)
        if len(local) < len(urls):
            label = self.param.name.replace("_", " ")
            remote = f"{label} takes files on this machine only; save the image, then drop the file"
            self._say([*problems, remote])
