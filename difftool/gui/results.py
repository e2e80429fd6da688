"""What the window does with results: show, compare, save (with metadata), copy, reuse, send to a task.

A mixin of :class:`~difftool.gui.app.MainWindow`, kept apart so each file holds one concern.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QFileDialog, QListWidgetItem

from difftool.core.images import save_image
from difftool.gui.convert import pil_to_qimage

SAVE_FILTER = "PNG with metadata (*.png);;JPEG with metadata (*.jpg);;WebP with metadata (*.webp)"


class ResultActions:
    """Result handling for the main window (which provides the widgets, ``history_list`` and ``settings``)."""

    def send_to(self, task: str | None) -> None:
        """The selected result becomes the input (of ``task``, or the current one): chain without saving."""
        job = self.history_list.selected_job()
        if job is None:
            self.show_error("run a task first: there is no result to use as input")
            return
        name, stem = f"result of #{job.id} {job.task}", f"{job.source_stem}.{job.task}"  # photo.superres
        self.set_source(job.result.image.copy(), None, name, stem, job.source_dir)
        if task is not None:
            self.task_box.setCurrentText(task)

    def selected_result(self) -> Any:
        job = self.history_list.selected_job()
        return job.result if job is not None else None

    def _on_history_selected(self, item: QListWidgetItem | None) -> None:
        if item is not None:  # clicked, or reached with the arrow keys: what is on screen is what Save saves
            self._show_result(self.history_list.job_of(item))

    def set_compare(self, on: bool) -> None:
        """The before | after view: a divider on the canvas (drag it); previews stay visible right of it."""
        self.canvas.compare = on
        if self.compare_check.isChecked() != on:
            self.compare_check.setChecked(on)
        self.canvas.update()

    def default_save_path(self) -> Path:
        """The selected result's ``<input stem>.<task>.png``, in the last folder saved to (else its input's)."""
        job = self.history_list.selected_job()
        if job is None:
            return Path.cwd() / "result.png"
        folder = self.settings.value("save_dir") or job.source_dir or Path.cwd()
        return Path(str(folder)) / f"{job.source_stem}.{job.task}.png"

    def save_result(self, path: str | Path) -> Path:
        """Write the selected result with its parameters (PNG text, JPEG/WebP EXIF) and say so."""
        result = self.selected_result()
        if result is None:
            raise ValueError("no result to save")
        saved = save_image(result.image, path, result.record)
        self.settings.setValue("save_dir", str(saved.parent))
        self.statusBar().showMessage(f"saved {saved} (with its parameters)", 10_000)
        return saved

    def save_dialog(self) -> None:
        if self.selected_result() is None:
            self.show_error("run a task first: there is no result to save")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save result", str(self.default_save_path()), SAVE_FILTER)
        if path:
            from difftool.core.errors import DifftoolError

            try:
                self.save_result(path)
            except DifftoolError as error:
                self.show_error(str(error))
            except OSError as error:  # a read-only folder, a full disk: nothing was written
                self.show_error(f"cannot save {path}: {error.strerror or error}; choose another folder")

    def copy_result(self) -> None:
        result = self.selected_result()
        if result is not None:
            QGuiApplication.clipboard().setImage(pil_to_qimage(result.image))

    def reuse_selected(self) -> None:
        """Edit > Reuse parameters: the form, seed and the job's own images (a painted mask comes back painted)."""
        job = self.history_list.selected_job()
        if job is None:
            return
        self.reuse_record(job.result.record, {})
        kinds = {p.name: p.type for p in self.registry.task(job.task).params}
        painted = [v for k, v in job.params.items() if kinds.get(k) in ("image", "mask") and isinstance(v, Image.Image)]
        if painted:  # the mask was painted, not a file: paint it back on the job's source
            if job.inputs and isinstance(job.inputs[0], Image.Image):
                self.set_source(job.inputs[0], None, job.source_name, job.source_stem, job.source_dir)
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
        if a1111:  # A1111's text, with its labels and sampler names turned into this task's parameters
            from difftool.core.metadata import params_from_a1111

            labels = {entry.label: name for name, entry in getattr(self.registry, "schedulers", {}).items()}
            for key, value in params_from_a1111(a1111, labels).items():
                values.setdefault(key, value)
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
