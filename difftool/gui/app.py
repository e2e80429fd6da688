"""The main window: the task and mask panels around the canvas, progress, history, menus."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image
from PySide6.QtCore import QSettings, Qt
from PySide6.QtGui import QAction, QGuiApplication, QIcon, QImage, QKeySequence, QPixmap
from PySide6.QtWidgets import (
    QApplication,
    QDialog,
    QDockWidget,
    QFileDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSlider,
)

from difftool.core.images import read_metadata, save_image
from difftool.gui.canvas import Canvas
from difftool.gui.convert import pil_to_qimage, qimage_to_pil
from difftool.gui.dialogs import about_dialog
from difftool.gui.form import ParamForm
from difftool.gui.jobs import Job, JobQueue
from difftool.gui.mask_panel import MaskPanel
from difftool.gui.task_panel import TaskPanel

SAVE_FILTER = "PNG with metadata (*.png);;JPEG (*.jpg);;WebP (*.webp)"


class MainWindow(QMainWindow):
    def __init__(self, registry: Any = None, settings: QSettings | None = None) -> None:
        super().__init__()
        from difftool.plugins.registry import get_registry

        self.registry = registry or get_registry()
        self.settings = settings or QSettings("difftool", "difftool")
        self.source: Image.Image | None = None
        self.source_path: Path | None = None
        self.history: list[Any] = []
        self.queue = JobQueue(preview_every=2)
        self.queue.signals.progress.connect(self._on_progress)
        self.queue.signals.finished.connect(self._on_finished)
        self.queue.signals.changed.connect(self._refresh_queue)
        self._started_at: dict[int, float] = {}
        self.setWindowTitle("difftool")
        self.setAcceptDrops(True)
        self.canvas = Canvas()
        self.setCentralWidget(self.canvas)
        # The side panels run the window's full height; history sits under the canvas only.
        self.setCorner(Qt.Corner.BottomLeftCorner, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.setCorner(Qt.Corner.BottomRightCorner, Qt.DockWidgetArea.RightDockWidgetArea)
        self._build_controls()
        self._build_bottom()
        self._build_menus()
        self.canvas.hovered.connect(self._on_hover)
        geometry = self.settings.value("geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        self.task_box.setCurrentText(str(self.settings.value("task", self.task_box.itemText(0))))
        self._on_task_changed()
        self._show_plugin_failures_once()

    # --- building ------------------------------------------------------------------------------
    def _build_controls(self) -> None:
        self.task_panel = TaskPanel(self.registry, self.settings, self.run_current, self._cancel_selected)
        panel = self.task_panel
        # The window's own names for the panel's widgets (scripts and tests drive the window).
        self.task_box, self.model_box, self.backend_box = panel.task_box, panel.model_box, panel.backend_box
        self.device_box, self.dtype_box, self.seed_box = panel.device_box, panel.dtype_box, panel.seed_box
        self.queue_list, self.run_button = panel.queue_list, panel.run_button
        dock = QDockWidget("Task", self)
        dock.setObjectName("task-dock")
        dock.setWidget(panel)
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, dock)

        self.mask_panel = MaskPanel(self.canvas, self.show_error)
        self.paint_check, self.brush_size = self.mask_panel.paint_check, self.mask_panel.brush_size
        self.hardness, self.eraser = self.mask_panel.hardness, self.mask_panel.eraser
        mask_dock = QDockWidget("Mask", self)
        mask_dock.setObjectName("mask-dock")
        mask_dock.setWidget(self.mask_panel)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, mask_dock)

        self.history_list = QListWidget()
        self.history_list.setViewMode(QListWidget.ViewMode.IconMode)
        self.history_list.setIconSize(QPixmap(96, 96).size())
        self.history_list.setMaximumHeight(130)
        self.history_list.itemClicked.connect(self._on_history_clicked)
        history_dock = QDockWidget("History", self)
        history_dock.setObjectName("history-dock")
        history_dock.setWidget(self.history_list)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, history_dock)

    @property
    def form(self) -> ParamForm:
        return self.task_panel.form

    def _build_bottom(self) -> None:
        bar = self.statusBar()
        self.info = QLabel("no image")
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(240)
        self.progress.setFormat("%v / %m")
        self.eta = QLabel()
        self.split = QSlider(Qt.Orientation.Horizontal)
        self.split.setRange(0, 100)
        self.split.setValue(100)
        self.split.setMaximumWidth(160)
        self.split.setToolTip("before / after")
        self.split.valueChanged.connect(lambda v: (setattr(self.canvas, "split", v / 100), self.canvas.update()))
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel_running)
        bar.addWidget(self.info, 1)
        bar.addPermanentWidget(QLabel("before/after"))
        bar.addPermanentWidget(self.split)
        bar.addPermanentWidget(self.progress)
        bar.addPermanentWidget(self.eta)
        bar.addPermanentWidget(self.cancel_button)

    def _build_menus(self) -> None:
        def action(menu: Any, text: str, slot: Any, shortcut: Any = None) -> QAction:
            act = QAction(text, self)
            act.triggered.connect(slot)
            if shortcut is not None:
                act.setShortcut(shortcut)
            menu.addAction(act)
            return act

        file_menu = self.menuBar().addMenu("&File")
        action(file_menu, "&Open…", self.open_dialog, QKeySequence.StandardKey.Open)
        action(file_menu, "&Save result…", self.save_dialog, QKeySequence.StandardKey.Save)
        action(file_menu, "&Quit", self.close, QKeySequence.StandardKey.Quit)
        edit_menu = self.menuBar().addMenu("&Edit")
        action(edit_menu, "&Paste image", self.paste, QKeySequence.StandardKey.Paste)
        action(edit_menu, "&Copy result", self.copy_result, QKeySequence.StandardKey.Copy)
        action(edit_menu, "&Reuse parameters of the selected result", self.reuse_selected)
        view_menu = self.menuBar().addMenu("&View")
        action(view_menu, "&Fit", self.canvas.fit, "Ctrl+0")
        action(view_menu, "&100%", self.canvas.actual_size, "Ctrl+1")
        help_menu = self.menuBar().addMenu("&Help")
        action(help_menu, "&Plugins…", self.show_plugins)
        action(help_menu, "&About difftool…", self.show_about)

    def _on_task_changed(self) -> None:
        self.task_panel.on_task_changed()

    # --- images -------------------------------------------------------------------------------
    def open_path(self, path: str | Path) -> None:
        from difftool.core.errors import DifftoolError
        from difftool.core.images import open_image

        try:
            loaded = open_image(path)
        except DifftoolError as error:
            self.show_error(str(error))
            return
        self.set_source(loaded.to_pil(keep_mode=False), Path(path))
        self.settings.setValue("open_dir", str(Path(path).parent))
        meta = read_metadata(path) if str(path).lower().endswith(".png") else {}
        if meta:
            self.reuse_record(meta.get("difftool") or {}, meta.get("parameters") or {})

    def set_source(self, image: Image.Image, path: Path | None = None) -> None:
        self.source, self.source_path = image, path
        self.canvas.set_image(pil_to_qimage(image))
        self.mask_panel.sync_brush()
        self.info.setText(f"{path.name if path else 'pasted image'} — {image.width}×{image.height} {image.mode}")

    def open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self,
            "Open image",
            str(self.settings.value("open_dir", "")),
            "Images (*.png *.jpg *.jpeg *.webp *.tif *.tiff *.bmp *.gif)",
        )
        if path:
            self.open_path(path)

    def paste(self) -> None:
        image = QGuiApplication.clipboard().image()
        if image.isNull():
            self.show_error("the clipboard holds no image")
            return
        self.set_source(qimage_to_pil(image).convert("RGBA"))

    def dragEnterEvent(self, event: Any) -> None:  # noqa: N802
        if event.mimeData().hasUrls() or event.mimeData().hasImage():
            event.acceptProposedAction()

    def dropEvent(self, event: Any) -> None:  # noqa: N802
        urls = event.mimeData().urls()
        if urls:
            self.open_path(urls[0].toLocalFile())
        elif event.mimeData().hasImage():
            self.set_source(qimage_to_pil(QImage(event.mimeData().imageData())))

    # --- mask ---------------------------------------------------------------------------------
    def painted_mask(self) -> Image.Image | None:
        """The painted mask as an ``L`` image the size of the source (``None`` if nothing is painted)."""
        return self.mask_panel.painted_mask()

    # --- running ------------------------------------------------------------------------------
    def build_job(self) -> Job:
        task = self.registry.task(self.task_box.currentText())
        params = self.form.values()
        mask_params = [p.name for p in task.params if p.type == "mask"]
        painted = self.painted_mask()
        for name in mask_params:
            if name not in params and painted is not None:
                params[name] = painted  # exactly what was painted, pixel for pixel
        options = {**self.task_panel.run_options(task.uses_model), "registry": self.registry}
        inputs: list[Any] = [self.source] if task.inputs else []
        return Job(task.name, inputs, params, options)

    def run_current(self) -> int | None:
        if self.source is None and self.registry.task(self.task_box.currentText()).inputs:
            self.show_error("open an image first (File > Open, drag and drop, or paste)")
            return None
        self.settings.setValue("backend", self.backend_box.currentText())
        return self.queue.submit(self.build_job())

    def cancel_running(self) -> None:
        if self.queue.running is not None:
            self.queue.cancel(self.queue.running)

    def _cancel_selected(self) -> None:
        item = self.queue_list.currentItem()
        if item is not None:
            self.queue.cancel(int(item.data(Qt.ItemDataRole.UserRole)))

    def _refresh_queue(self) -> None:
        self.queue_list.clear()
        for job in self.queue.jobs.values():
            if job.state in ("queued", "running"):
                item = QListWidgetItem(job.label())
                item.setData(Qt.ItemDataRole.UserRole, job.id)
                self.queue_list.addItem(item)
        self.cancel_button.setEnabled(self.queue.running is not None)

    def _on_progress(self, job_id: int, step: int, total: int, preview: Any) -> None:
        started = self._started_at.setdefault(job_id, time.perf_counter())
        self.progress.setRange(0, total)
        self.progress.setValue(step)
        if step:
            remaining = (time.perf_counter() - started) / step * (total - step)
            self.eta.setText(f"ETA {remaining:.0f} s")
        if preview is not None:
            self.canvas.set_result(pil_to_qimage(preview))

    def _on_finished(self, job_id: int) -> None:
        job = self.queue.jobs[job_id]
        self.eta.setText(job.state)
        if job.state == "done":
            self.history.append(job)
            image = job.result.image
            self.canvas.set_result(pil_to_qimage(image))
            item = QListWidgetItem(
                QIcon(
                    QPixmap.fromImage(pil_to_qimage(image.copy()).scaled(96, 96, Qt.AspectRatioMode.KeepAspectRatio))
                ),
                f"{job.task} #{job.id}",
            )
            item.setData(Qt.ItemDataRole.UserRole, len(self.history) - 1)
            item.setToolTip(json.dumps(job.result.record, indent=1, default=str))
            self.history_list.addItem(item)
            self.history_list.setCurrentItem(item)
        elif job.state == "failed":
            self.show_error(job.error, getattr(job, "details", ""))

    # --- results ------------------------------------------------------------------------------
    def selected_result(self) -> Any:
        item = self.history_list.currentItem()
        return self.history[int(item.data(Qt.ItemDataRole.UserRole))].result if item else None

    def _on_history_clicked(self, item: QListWidgetItem) -> None:
        self.canvas.set_result(pil_to_qimage(self.history[int(item.data(Qt.ItemDataRole.UserRole))].result.image))

    def save_result(self, path: str | Path) -> Path:
        result = self.selected_result()
        if result is None:
            raise ValueError("no result to save")
        return save_image(result.image, path, result.record)

    def save_dialog(self) -> None:
        if self.selected_result() is None:
            self.show_error("run a task first: there is no result to save")
            return
        default = str(Path(str(self.settings.value("save_dir", ""))) / "result.png")
        path, _ = QFileDialog.getSaveFileName(self, "Save result", default, SAVE_FILTER)
        if path:
            from difftool.core.errors import DifftoolError

            try:
                self.save_result(path)
                self.settings.setValue("save_dir", str(Path(path).parent))
            except DifftoolError as error:
                self.show_error(str(error))

    def copy_result(self) -> None:
        result = self.selected_result()
        if result is not None:
            QGuiApplication.clipboard().setImage(pil_to_qimage(result.image))

    def reuse_selected(self) -> None:
        """Edit > Reuse parameters: the form, seed and the job's own images (a painted mask comes back painted)."""
        item = self.history_list.currentItem()
        if item is None:
            return
        job = self.history[int(item.data(Qt.ItemDataRole.UserRole))]
        self.reuse_record(job.result.record, {})
        kinds = {p.name: p.type for p in self.registry.task(job.task).params}
        painted = [v for k, v in job.params.items() if kinds.get(k) in ("image", "mask") and isinstance(v, Image.Image)]
        if painted:  # the mask was painted, not a file: paint it back on the job's source
            if job.inputs and isinstance(job.inputs[0], Image.Image):
                self.set_source(job.inputs[0])
            if self.canvas.mask is not None:
                self.canvas.mask.load(pil_to_qimage(painted[0].convert("L")))
                self.canvas.update()
            self.statusBar().showMessage("the painted mask is back on the canvas", 10_000)

    def reuse_record(self, record: dict[str, Any], a1111: dict[str, Any]) -> None:
        """Fill the task, form and seed from a difftool record or A1111 ``parameters``."""
        task = record.get("task") or a1111.get("difftool task")
        if task in self.registry.tasks:
            self.task_box.setCurrentText(task)
        values = dict(record)
        if a1111:
            values.setdefault("steps", a1111.get("Steps"))
            values.setdefault("seed", a1111.get("Seed"))
            values.setdefault("prompt", a1111.get("prompt"))
            values.setdefault("negative_prompt", a1111.get("negative_prompt"))
        missing = []
        for param in self.form.task.params:  # images come back as images, never as their record's text
            value = values.get(param.name)
            if param.type in ("image", "mask") and value is not None:
                if value == "<image>" or not Path(str(value)).is_file():
                    values.pop(param.name)
                    missing.append(param.name)
        self.form.set_values({k: v for k, v in values.items() if k in self.form.widgets})
        if values.get("seed") not in (None, ""):
            self.seed_box.setValue(int(values["seed"]))
        for name in missing:
            self.form.widgets[name].edit.clear()  # a PathField: empty, not the previous run's file
        if missing:
            self.statusBar().showMessage(
                f"{', '.join(missing)}: the image it used is not a file here (it was painted or moved); "
                "paint it or choose it again",
                10_000,
            )

    # --- messages -----------------------------------------------------------------------------
    def show_error(self, message: str, details: str = "") -> None:
        box = QMessageBox(QMessageBox.Icon.Warning, "difftool", message, parent=self)
        if details:
            box.setDetailedText(details)
        box.setModal(False)
        box.show()
        self.last_error = message

    def show_plugins(self) -> None:
        lines = [f"{info.name}: {', '.join(info.registered) or 'nothing'}" for info in self.registry.plugins.values()]
        lines += [f"FAILED {failure}" for failure in self.registry.failures]
        QMessageBox.information(self, "Plugins", "\n".join(lines))

    def show_about(self) -> QDialog:
        """Help > About: the same report as `difftool info`, with a button to copy it for a bug report."""
        self.about_dialog = about_dialog(self, self.registry)
        return self.about_dialog

    def _show_plugin_failures_once(self) -> None:
        if self.registry.failures:
            self.statusBar().showMessage(f"{len(self.registry.failures)} plugin(s) failed: see Help > Plugins", 10_000)

    def _on_hover(self, x: int, y: int) -> None:
        image = self.canvas.shown()
        if image is not None and 0 <= x < image.width() and 0 <= y < image.height():
            self.statusBar().showMessage(f"{x}, {y}   zoom {self.canvas.scale * 100:.0f}%", 2000)

    def closeEvent(self, event: Any) -> None:  # noqa: N802
        self.settings.setValue("geometry", self.saveGeometry())
        for job_id, job in list(self.queue.jobs.items()):
            if job.state in ("queued", "running"):
                self.queue.cancel(job_id)
        self.queue.wait(10_000)
        super().closeEvent(event)


def run_app(argv: list[str]) -> int:
    app = QApplication.instance() or QApplication([sys.argv[0], *argv])
    app.setApplicationName("difftool")
    window = MainWindow()
    window.resize(1280, 800)
    window.show()
    for path in argv:
        if Path(path).is_file():
            window.open_path(path)
            break
    return app.exec()
