"""The main window: the task and mask panels around the canvas, status, history, menus."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from PIL import Image
from PySide6.QtCore import QSettings, Qt
from PySide6.QtGui import QAction, QGuiApplication, QImage, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QCheckBox,
    QDialog,
    QDockWidget,
    QFileDialog,
    QListWidgetItem,
    QMainWindow,
    QMessageBox,
    QWidget,
)
from shiboken6 import isValid

from difftool.core.images import read_metadata
from difftool.gui.canvas import Canvas
from difftool.gui.convert import pil_to_qimage, qimage_to_pil
from difftool.gui.dialogs import about_dialog
from difftool.gui.form import ParamForm
from difftool.gui.history import HistoryStrip
from difftool.gui.jobs import Job, JobQueue
from difftool.gui.mask_panel import MaskPanel
from difftool.gui.messages import for_the_window
from difftool.gui.results import ResultActions
from difftool.gui.status import RunStatus
from difftool.gui.task_panel import TaskPanel


class MainWindow(ResultActions, QMainWindow):
    def __init__(self, registry: Any = None, settings: QSettings | None = None) -> None:
        super().__init__()
        from difftool.plugins.registry import get_registry

        self.registry = registry or get_registry()
        self.settings = settings or QSettings("difftool", "difftool")
        self.source: Image.Image | None = None
        self.source_path: Path | None = None
        self.source_name, self.source_stem, self.source_dir = "", "image", ""
        self.queue = JobQueue(preview_every=2)
        self.queue.signals.started.connect(lambda job_id: self.status.started(self.queue.jobs[job_id]))
        self.queue.signals.phase.connect(self._on_phase)
        self.queue.signals.progress.connect(self._on_progress)
        self.queue.signals.finished.connect(self._on_finished)
        self.queue.signals.changed.connect(self._refresh_queue)
        self.queue.signals.abandoned.connect(lambda job_id: self.status.finished(self.queue.jobs[job_id]))
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
        self.canvas.source_shown.connect(self._describe_source)
        geometry = self.settings.value("geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        self.task_box.currentTextChanged.connect(self._on_task_changed)
        self.task_box.setCurrentText(str(self.settings.value("task", self.task_box.itemText(0))))
        self.task_panel.on_task_changed()
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
        self.mask_dock = QDockWidget("Mask", self)
        self.mask_dock.setObjectName("mask-dock")
        self.mask_dock.setWidget(self.mask_panel)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.mask_dock)

        self.history_list = HistoryStrip()
        self.history_list.currentItemChanged.connect(self._on_history_selected)
        history_dock = QDockWidget("History", self)
        history_dock.setObjectName("history-dock")
        history_dock.setWidget(self.history_list)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, history_dock)

    @property
    def form(self) -> ParamForm:
        return self.task_panel.form

    def _build_bottom(self) -> None:
        self.compare_check = QCheckBox("compare")
        self.compare_check.setToolTip("before | after with a divider on the canvas: drag it with the left button")
        self.compare_check.toggled.connect(self.set_compare)
        self.status = RunStatus(self.statusBar(), self.cancel_running, first=self.compare_check)
        self.progress, self.cancel_button = self.status.progress, self.status.cancel_button

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
        action(edit_menu, "&Use result as input", lambda: self.send_to(None), "Ctrl+I")
        send_menu = edit_menu.addMenu("&Send result to")
        for name in sorted(self.registry.tasks):
            if self.registry.tasks[name].cls.inputs:
                action(send_menu, name, lambda _=False, n=name: self.send_to(n))
        view_menu = self.menuBar().addMenu("&View")
        action(view_menu, "&Fit", self.canvas.fit, "Ctrl+0")
        action(view_menu, "&100%", self.canvas.actual_size, "Ctrl+1")
        action(view_menu, "&Compare before | after", self.compare_check.toggle, "C")
        help_menu = self.menuBar().addMenu("&Help")
        action(help_menu, "&Plugins…", self.show_plugins)
        action(help_menu, "&About difftool…", self.show_about)

    def _on_task_changed(self) -> None:
        task = self.registry.task(self.task_box.currentText())
        takes_mask = any(p.type == "mask" for p in task.params)
        self.mask_dock.setVisible(takes_mask)  # only tasks that take a mask
        if not takes_mask:
            self.paint_check.setChecked(False)  # no invisible painting with the panel gone

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
        try:
            meta = read_metadata(path)  # PNG text, or JPEG/WebP EXIF
        except DifftoolError:
            meta = {}  # unreadable metadata: the image itself opened fine
        if meta:
            self.reuse_record(meta.get("difftool") or {}, meta.get("parameters") or {})

    def set_source(
        self, image: Image.Image, path: Path | None = None, name: str = "", stem: str = "", folder: str = ""
    ) -> None:
        """A new image to work on; ``name``, ``stem`` and ``folder`` default to the file's (a chained result
        passes its input's: its result is saved as ``photo.superres.inpaint.png`` beside ``photo.png``)."""
        self.source, self.source_path = image, path
        self.canvas.set_image(pil_to_qimage(image))
        self.mask_panel.sync_brush()
        self.source_name = name or (path.name if path else "pasted image")
        self.source_stem = stem or (path.stem if path else "image")
        self.source_dir = folder or (str(path.parent) if path else "")
        self._describe_source()

    def _describe_source(self) -> None:
        if self.source is not None:
            image = self.source
            self.status.showing(f"{self.source_name} — {image.width}×{image.height} {image.mode}")

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
        """One image opens; a folder or several images become a batch: one queued job each."""
        paths = [Path(url.toLocalFile()) for url in event.mimeData().urls() if url.isLocalFile()]
        if len(paths) == 1 and paths[0].is_file():
            self.open_path(paths[0])
        elif paths:
            self.run_batch(paths)
        elif event.mimeData().hasImage():
            self.set_source(qimage_to_pil(QImage(event.mimeData().imageData())))

    def run_batch(self, paths: list[Path]) -> list[int]:
        """Queue the current task with the current form for every image in ``paths`` (folders expanded)."""
        from difftool.batch import IMAGE_SUFFIXES

        listed = [f for p in paths for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
        files = [f for f in listed if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        task = self.registry.task(self.task_box.currentText())
        if not task.inputs:
            self.show_error(f"{task.name} takes no input image; pick a task that does, then drop the images again")
            return []
        if not files:
            self.show_error(f"no images among what was dropped ({', '.join(sorted(IMAGE_SUFFIXES))})")
            return []
        ids = [self.queue.submit(self.build_job([str(f)])) for f in files]
        self.statusBar().showMessage(f"queued {len(ids)} image(s) for {task.name}", 10_000)
        return ids

    # --- mask ---------------------------------------------------------------------------------
    def painted_mask(self) -> Image.Image | None:
        """The painted mask as an ``L`` image the size of the source (``None`` if nothing is painted)."""
        return self.mask_panel.painted_mask()

    # --- running ------------------------------------------------------------------------------
    def build_job(self, inputs: list[Any] | None = None) -> Job:
        """The current task, form and options as a job on ``inputs`` (default: the image on the canvas)."""
        task = self.registry.task(self.task_box.currentText())
        params = self.form.values()
        mask_params = [p.name for p in task.params if p.type == "mask"]
        painted = self.painted_mask() if inputs is None else None
        for name in mask_params[:1]:
            if painted is not None:
                params[name] = painted  # exactly what was painted, pixel for pixel (what is on screen wins)
        options = {**self.task_panel.run_options(task.uses_model), "registry": self.registry}
        self.task_panel.remember()
        if inputs is not None:  # a batch: each job knows its own file
            path = Path(str(inputs[0]))
            origin = {"source_name": path.name, "source_stem": path.stem, "source_dir": str(path.parent)}
        else:
            inputs = [self.source] if task.inputs else []
            origin = {"source_name": self.source_name, "source_stem": self.source_stem, "source_dir": self.source_dir}
            if task.inputs and self.source is not None:
                origin["before"] = self.canvas.before
        if not task.inputs:
            origin = {"source_name": "", "source_stem": task.name, "source_dir": self.source_dir}
        return Job(task.name, inputs, params, options, **origin)

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

    def _live(self, job_id: int) -> bool:
        """Whether the job's signals still speak for the screen (an abandoned job's late ones do not)."""
        return job_id not in self.queue.abandoned

    def _refresh_queue(self) -> None:
        self.queue_list.clear()
        for job in self.queue.jobs.values():
            if job.state in ("queued", "running"):
                item = QListWidgetItem(job.label())
                item.setData(Qt.ItemDataRole.UserRole, job.id)
                self.queue_list.addItem(item)
        self.status.running(self.queue.running is not None)

    def _update_row(self, job: Job) -> None:
        """The job's queue row names what it is doing now (its phase, its step)."""
        for index in range(self.queue_list.count()):
            item = self.queue_list.item(index)
            if item.data(Qt.ItemDataRole.UserRole) == job.id:
                item.setText(job.label())

    def _on_phase(self, job_id: int, what: str, done: int, total: int) -> None:
        if self._live(job_id):
            job = self.queue.jobs[job_id]
            self.status.phase(job, what, None if done < 0 else done, None if total < 0 else total)
            self._update_row(job)

    def _on_progress(self, job_id: int, step: int, total: int, preview: Any) -> None:
        if not self._live(job_id):
            return
        job = self.queue.jobs[job_id]
        self.status.step(job, step, total)
        self._update_row(job)
        if preview is not None:
            self.paint_check.setChecked(False)  # the preview takes the screen: paint again on the source after
            self.canvas.set_result(pil_to_qimage(preview), self._before(job))
            self.status.showing(f"preview of #{job.id} {job.task}, step {step} / {total}")

    def _on_finished(self, job_id: int) -> None:
        if not self._live(job_id):
            return
        job = self.queue.jobs[job_id]
        message = self.rendered(job.error, job.task) if job.state == "failed" else ""
        self.status.finished(job, message)
        if job.state == "done":
            self.history_list.add(job)  # selecting it shows it (_on_history_selected)
        elif job.state == "failed":
            self.show_error(job.error, job.details, job.task)

    def _before(self, job: Job) -> Any:
        """The job's input as a QImage for the compare view (loaded once; ``None`` for a job without one)."""
        if job.before is None and job.inputs and isinstance(job.inputs[0], (str, Path)):
            from difftool.core.errors import DifftoolError
            from difftool.core.images import open_image

            try:
                job.before = pil_to_qimage(open_image(job.inputs[0]).to_pil(keep_mode=False))
            except DifftoolError:
                return None
        return job.before

    def _show_result(self, job: Job) -> None:
        image = job.result.image
        self.paint_check.setChecked(False)  # the result takes the screen
        self.canvas.set_result(pil_to_qimage(image), self._before(job))
        origin = f" (from {job.source_name})" if job.source_name else ""
        self.status.showing(f"result of #{job.id} {job.task} — {image.width}×{image.height}{origin}")

    # --- messages -----------------------------------------------------------------------------
    def rendered(self, message: str, task: str | None = None) -> str:
        return self._render(message, task)[0]

    def _render(self, message: str, task: str | None) -> tuple[str, list[str]]:
        params = self.registry.task(task).params if task in self.registry.tasks else self.form.task.params
        masks = [p.name for p in params if p.type == "mask"]
        return for_the_window(message, [p.name for p in params], masks)

    def show_error(self, message: str, details: str = "", task: str | None = None) -> None:
        """The error in the window's words (fields, not CLI flags), with the fields it names highlighted
        when ``task`` (default: the one on screen) is the task on screen."""
        text, fields = self._render(message, task)
        box = QMessageBox(QMessageBox.Icon.Warning, "difftool", text, parent=self)
        if details:
            box.setDetailedText(details)
        box.setModal(False)
        box.show()
        self.last_error = text
        self.highlight(fields if task in (None, self.form.task.name) else [])

    def highlight(self, fields: list[str]) -> None:
        """Mark the named fields (until the next error) and put the focus in the first."""
        panel = {"model": self.model_box, "backend": self.backend_box, "device": self.device_box}
        panel |= {"dtype": self.dtype_box, "seed": self.seed_box, "backend-opt": self.task_panel.options_box}
        for widget in getattr(self, "_highlighted", []):
            if isValid(widget):  # a previous task's form may be gone
                widget.setStyleSheet("")
        self._highlighted: list[QWidget] = [
            w for w in (self.form.widgets.get(f) or panel.get(f) for f in fields) if w is not None
        ]
        for widget in self._highlighted:
            widget.setStyleSheet("border: 2px solid #d9480f;")
        if self._highlighted:
            self._highlighted[0].setFocus()
        if any(f in self.form.widgets and self.form.task.param(f).type == "mask" for f in fields):
            self.mask_dock.show()
            self.mask_dock.raise_()

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
        inside = image is not None and 0 <= x < image.width() and 0 <= y < image.height()
        self.status.pointer.setText(f"{x}, {y}  {self.canvas.scale * 100:.0f}%" if inside else "")

    def closeEvent(self, event: Any) -> None:  # noqa: N802
        self.settings.setValue("geometry", self.saveGeometry())
        self.task_panel.remember()
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
