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
    QMainWindow,
    QMessageBox,
    QWidget,
)
from shiboken6 import isValid

from difftool.core.images import read_metadata
from difftool.core.task import RegistryView
from difftool.gui import wheel
from difftool.gui.canvas import Canvas
from difftool.gui.convert import pil_to_qimage, qimage_to_pil
from difftool.gui.dialogs import about_dialog, ask_server
from difftool.gui.form import ParamForm
from difftool.gui.history import HistoryStrip
from difftool.gui.job_queue import JobQueue
from difftool.gui.mask_panel import MaskPanel
from difftool.gui.messages import for_the_window, outline, outline_targets
from difftool.gui.prompt_tools import fill_insert_menu
from difftool.gui.results import ResultActions
from difftool.gui.running import JobActions
from difftool.gui.status import RunStatus
from difftool.gui.task_panel import TaskPanel

#: The task panel's first width: at 1280x800 the canvas keeps most of the window, and a prompt box, a
#: ControlNet unit's fields and the queue's rows fit without being cut.
PANEL_WIDTH = 390


class MainWindow(JobActions, ResultActions, QMainWindow):
    def __init__(self, registry: RegistryView | None = None, settings: QSettings | None = None) -> None:
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
        self.queue.signals.cancelling.connect(self._on_cancelling)
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
        self.canvas.zoomed.connect(lambda scale: self.status.zoom.setText(f"{scale * 100:.0f}%"))
        self.canvas.source_shown.connect(self._describe_source)
        geometry = self.settings.value("geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        # The panel's width (and the docks' places) as the artist left them; at first a width that fits a
        # prompt box, a ControlNet unit's fields and the queue's rows at 1280x800.
        state = self.settings.value("window_state")
        if state is None or not self.restoreState(state):
            self.resizeDocks([self.task_dock], [PANEL_WIDTH], Qt.Orientation.Horizontal)
        self.task_box.currentTextChanged.connect(self._on_task_changed)
        self.task_box.setCurrentText(str(self.settings.value("task", self.task_box.itemText(0))))
        self.task_panel.on_task_changed()
        self._on_task_changed()
        self._show_plugin_failures_once()

    # --- building ------------------------------------------------------------------------------
    def _build_task_panel(self) -> None:
        self.task_panel = TaskPanel(
            self.registry,
            self.settings,
            self.run_current,
            self._cancel_selected,
            source=lambda: self.source,
            source_path=lambda: self.source_path,
        )
        panel = self.task_panel
        # The window's own names for the panel's widgets (scripts and tests drive the window).
        self.task_box, self.model_box, self.backend_box = panel.task_box, panel.model_box, panel.backend_box
        self.device_box, self.dtype_box, self.seed_box = panel.device_box, panel.dtype_box, panel.seed_box
        self.queue_list, self.run_button = panel.queue_list, panel.run_button
        self.task_dock.setWidget(panel)

    def _build_controls(self) -> None:
        self.task_dock = QDockWidget("Task", self)
        self.task_dock.setObjectName("task-dock")
        self._build_task_panel()
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, self.task_dock)

        self.mask_panel = MaskPanel(self.canvas, self.show_error)
        self.paint_check, self.brush_size = self.mask_panel.paint_check, self.mask_panel.brush_size
        self.hardness, self.eraser = self.mask_panel.hardness, self.mask_panel.eraser
        wheel.guard(self.mask_panel)  # the wheel never changes a value it passes over
        self.mask_dock = QDockWidget("Mask", self)
        self.mask_dock.setObjectName("mask-dock")
        self.mask_dock.setWidget(self.mask_panel)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.mask_dock)

        self.history_list = HistoryStrip()
        self.history_list.currentItemChanged.connect(self._on_history_selected)
        self.history_list.compare_with.connect(self.compare_against)
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
        action(file_menu, "Save all results of this &batch…", self.save_batch_dialog, "Ctrl+Shift+S")
        action(file_menu, "C&onnect to server…", self.connect_dialog)
        action(file_menu, "&Disconnect (run here)", lambda: self.use_registry(None))
        action(file_menu, "&Quit", self.close, QKeySequence.StandardKey.Quit)
        edit_menu = self.menuBar().addMenu("&Edit")
        action(edit_menu, "&Paste image", self.paste, QKeySequence.StandardKey.Paste)
        action(edit_menu, "&Copy result", self.copy_result, QKeySequence.StandardKey.Copy)
        action(edit_menu, "&Reuse parameters of the selected result", self.reuse_selected)
        action(edit_menu, "Reuse parameters from an &image file…", self.reuse_file_dialog)
        action(edit_menu, "&Use result as input", lambda: self.send_to(None), "Ctrl+I")
        self.send_menu = edit_menu.addMenu("&Send result to")

        def fill_send_menu() -> None:  # the tasks of the registry in use (this machine's, or a server's)
            self.send_menu.clear()
            for name in sorted(self.registry.tasks):
                if self.registry.tasks[name].value.inputs:
                    action(self.send_menu, name, lambda _=False, n=name: self.send_to(n))

        self.send_menu.aboutToShow.connect(fill_send_menu)
        self.insert_menu = edit_menu.addMenu("&Insert into prompt")
        self.insert_menu.aboutToShow.connect(lambda: fill_insert_menu(self.insert_menu, self))
        job_menu = self.menuBar().addMenu("&Job")
        run = action(job_menu, "&Run", self.run_current)
        # From anywhere in the window, the prompt box included (a plain Enter there is a new line).
        run.setShortcuts([QKeySequence("Ctrl+Return"), QKeySequence("Ctrl+Enter")])
        action(job_menu, "&Cancel the running job", self.cancel_running)
        view_menu = self.menuBar().addMenu("&View")
        action(view_menu, "&Fit", self.canvas.fit, "Ctrl+0")
        action(view_menu, "&100%", self.canvas.actual_size, "Ctrl+1")
        action(view_menu, "&Compare before | after", self.compare_check.toggle, "C")
        action(view_menu, "Compare results against &this one (A/B)", self.pin_for_compare, "B")
        help_menu = self.menuBar().addMenu("&Help")
        action(help_menu, "&Plugins…", self.show_plugins)
        action(help_menu, "&About difftool…", self.show_about)

    def connect_dialog(self) -> None:
        """File > Connect to server: the window's tasks, models and jobs come from a `difftool serve`."""
        found = ask_server(self, str(self.settings.value("server_url", "http://127.0.0.1:7860")))
        if found is not None:
            self.connect_to(*found)

    def connect_to(self, url: str, token: str | None = None) -> bool:
        from difftool.core.errors import DifftoolError
        from difftool.gui.remote import RemoteRegistry

        try:
            registry = RemoteRegistry(url, token)
        except DifftoolError as error:
            self.show_error(str(error))
            return False
        self.settings.setValue("server_url", url)
        self.use_registry(registry, url)
        return True

    def use_registry(self, registry: RegistryView | None, server: str = "") -> None:
        """Run on ``registry`` (a server's, or ``None``: this machine's plugins) from now on."""
        from difftool.plugins.registry import get_registry

        self.task_panel.remember()
        task, seed = self.task_box.currentText(), self.seed_box.value()  # kept: the artist's, not the server's
        self.registry = registry or get_registry()
        old = self.task_panel
        self._build_task_panel()
        old.deleteLater()
        if task in self.registry.tasks:
            self.task_box.setCurrentText(task)
        self.seed_box.setValue(seed)
        self.task_box.currentTextChanged.connect(self._on_task_changed)
        self.task_panel.on_task_changed()
        self._on_task_changed()
        self.setWindowTitle(f"difftool — {server}" if server else "difftool")
        self.status.job.setText(f"connected to {server}" if server else "running on this machine")

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
        # Opening sets the input and nothing else: the record an image carries may come from anyone (it can
        # name files and ask for pickles). Reusing it is its own action, which shows what it would fill.
        try:
            meta = read_metadata(path)  # PNG text, or JPEG/WebP EXIF
        except DifftoolError:
            meta = {}  # unreadable metadata: the image itself opened fine
        if meta.get("difftool") or meta.get("parameters"):
            self.statusBar().showMessage(
                f"{Path(path).name} carries the parameters it was made with: "
                "Edit > Reuse parameters from an image file… fills the form with them",
                15_000,
            )

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
        from difftool.app.batch import IMAGE_SUFFIXES

        listed = [f for p in paths for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
        files = [f for f in listed if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        task = self.registry.task(self.task_box.currentText())
        if not task.inputs:
            self.show_error(f"{task.name} takes no input image; pick a task that does, then drop the images again")
            return []
        if not files:
            self.show_error(f"no images among what was dropped ({', '.join(sorted(IMAGE_SUFFIXES))})")
            return []
        self._batches = getattr(self, "_batches", 0) + 1
        jobs = [self.build_job([str(f)]) for f in files]
        for job in jobs:
            job.batch = self._batches
        ids = [self.queue.submit(job) for job in jobs]
        self.statusBar().showMessage(f"queued {len(ids)} image(s) for {task.name}", 10_000)
        self.status.batch_progress(self.batch_jobs(self._batches))
        return ids

    def batch_jobs(self, batch: int) -> list[Any]:
        return [job for job in self.queue.jobs.values() if job.batch == batch and batch]

    # --- mask ---------------------------------------------------------------------------------
    def painted_mask(self) -> Image.Image | None:
        """The painted mask as an ``L`` image the size of the source (``None`` if nothing is painted)."""
        return self.mask_panel.painted_mask()

    # --- messages -----------------------------------------------------------------------------
    def rendered(self, message: str, task: str | None = None) -> str:
        return self._render(message, task)[0]

    def _render(self, message: str, task: str | None) -> tuple[str, list[str]]:
        params = self.registry.task(task).params if task in self.registry.tasks else self.form.task.params
        masks = [p.name for p in params if p.type == "mask"]
        return for_the_window(message, [p.name for p in params], masks)

    def show_error(
        self, message: str, details: str = "", task: str | None = None, outline: list[QWidget] | None = None
    ) -> None:
        """The error in the window's words (fields, not CLI flags), with the fields it names outlined when
        ``task`` (default: the one on screen) is the task on screen; ``outline``: the exact widgets to fix."""
        text, fields = self._render(message, task)
        box = QMessageBox(QMessageBox.Icon.Warning, "difftool", text, parent=self)
        if details:
            box.setDetailedText(details)
        box.setModal(False)
        box.show()
        self.last_error = text
        self.highlight(fields if task in (None, self.form.task.name) else [], outline or [])

    def highlight(self, fields: list[str], widgets: list[QWidget] | None = None) -> None:
        """Outline the named fields (and ``widgets``) and put the focus in the first. Only the field itself is
        outlined, never the widgets inside it; the outline goes when the field is edited, or the next error."""
        panel = {"model": self.model_box, "backend": self.backend_box, "device": self.device_box}
        panel |= {"dtype": self.dtype_box, "seed": self.seed_box, "backend-opt": self.task_panel.options_box}
        for widget in getattr(self, "_highlighted", []):
            if isValid(widget):  # a previous task's form may be gone
                widget.setStyleSheet("")
        named = [w for w in (self.form.widgets.get(f) or panel.get(f) for f in fields) if w is not None]
        self._highlighted: list[QWidget] = [t for w in [*(widgets or []), *named] for t in outline_targets(w)]
        for widget in self._highlighted:
            outline(widget)
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
        self.status.pointer.setText(f"{x}, {y}" if inside else "")

    def closeEvent(self, event: Any) -> None:  # noqa: N802
        self.settings.setValue("geometry", self.saveGeometry())
        self.settings.setValue("window_state", self.saveState())
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
