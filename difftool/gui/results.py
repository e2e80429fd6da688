"""What the window does with results: show, compare, save (with metadata), copy, reuse, send to a task.

A mixin of :class:`~difftool.gui.app.MainWindow`, kept apart so each file holds one concern.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QFileDialog, QListWidgetItem, QMessageBox

from difftool.core.images import read_metadata, save_image
from difftool.gui.convert import pil_to_qimage
from difftool.gui.reuse import Reuse, plan_reuse

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

    def compare_against(self, job: Any) -> None:
        """A/B: set the shown result (and every result selected after it) against ``job``'s with the divider;
        ``None``: back to each result against its input. Selecting ``job`` itself shows it against its input."""
        self.history_list.reference = job
        shown = self.history_list.selected_job()
        if job is not None:
            self.set_compare(True)
        if shown is not None:
            self._show_result(shown)
        message = f"comparing results against #{job.id} {job.task} (B toggles)" if job is not None else ""
        self.statusBar().showMessage(message or "comparing each result against its input", 5000)

    def pin_for_compare(self) -> None:
        """View > Compare against this result (B): the shown result becomes A; a second B stops."""
        job = self.history_list.selected_job()
        reference = self.history_list.reference
        self.compare_against(None if job is None or reference is job else job)

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

    def selected_batch(self) -> list[Any]:
        """The finished jobs of the selected result's batch (else of the latest batch dropped)."""
        job = self.history_list.selected_job()
        batch = job.batch if job is not None and job.batch else getattr(self, "_batches", 0)
        return [j for j in self.batch_jobs(batch) if j.state == "done" and j.result is not None]

    def save_batch(self, folder: str | Path, replace: bool = False) -> tuple[list[Path], list[Path]]:
        """Save every result of the batch into ``folder`` as ``<input stem>.<task>.png`` with its parameters;
        returns (saved, skipped: files already there, kept unless ``replace``)."""
        saved, skipped = [], []
        for job in self.selected_batch():
            target = Path(folder) / f"{job.source_stem}.{job.task}.png"
            if target.exists() and not replace:
                skipped.append(target)
                continue
            saved.append(save_image(job.result.image, target, job.result.record))
        self.settings.setValue("save_dir", str(folder))
        kept = f"; {len(skipped)} kept (already there)" if skipped else ""
        self.statusBar().showMessage(f"saved {len(saved)} result(s) in {folder} (with their parameters){kept}", 10_000)
        return saved, skipped

    def save_batch_dialog(self) -> None:
        jobs = self.selected_batch()
        if not jobs:
            self.show_error("no batch has results yet: drop a folder or several images on the window first")
            return
        start = str(self.settings.value("save_dir") or jobs[0].source_dir or Path.cwd())
        folder = QFileDialog.getExistingDirectory(self, f"Save the {len(jobs)} results of this batch in", start)
        if not folder:
            return
        there = [j for j in jobs if (Path(folder) / f"{j.source_stem}.{j.task}.png").exists()]
        replace = False
        if there:
            answer = QMessageBox.question(
                self,
                "Save all results of this batch",
                f"{len(there)} of the {len(jobs)} files are already in {folder}. Replace them?",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No | QMessageBox.StandardButton.Cancel,
            )
            if answer == QMessageBox.StandardButton.Cancel:
                return
            replace = answer == QMessageBox.StandardButton.Yes
        from difftool.core.errors import DifftoolError

        try:
            self.save_batch(folder, replace)
        except DifftoolError as error:
            self.show_error(str(error))
        except OSError as error:
            self.show_error(f"cannot save in {folder}: {error.strerror or error}; choose another folder")

    def copy_result(self) -> None:
        result = self.selected_result()
        if result is not None:
            QGuiApplication.clipboard().setImage(pil_to_qimage(result.image))

    def reuse_selected(self) -> None:
        """Edit > Reuse parameters: every field the record holds (the others back to the task's defaults), the
        model, backend, device, precision and seed, and the job's own images (a painted mask comes back painted).
        """
        job = self.history_list.selected_job()
        if job is None:
            self.show_error("run a task first: there is no result to reuse")
            return
        reuse = plan_reuse(job.result.record, {}, self.registry.task(job.task).params, trusted=True)
        notes = self.apply_reuse(reuse, with_files=True)
        kinds = {p.name: p.type for p in self.registry.task(job.task).params}
        painted = [v for k, v in job.params.items() if kinds.get(k) in ("image", "mask") and isinstance(v, Image.Image)]
        if painted:  # the mask was painted, not a file: paint it back on the job's source
            if job.inputs and isinstance(job.inputs[0], Image.Image):
                self.set_source(job.inputs[0], None, job.source_name, job.source_stem, job.source_dir)
            if self.canvas.mask is not None:
                self.canvas.mask.load(pil_to_qimage(painted[0].convert("L")))
                self.canvas.update()
            notes = [n for n in notes if "painted" not in n] + ["the painted mask is back on the canvas"]
        self.statusBar().showMessage(f"reused the parameters of #{job.id} {job.task}; " + "; ".join(notes), 15_000)

    def reuse_file_dialog(self) -> None:
        """Edit > Reuse parameters from an image file…: the form from the record an image carries."""
        start = str(self.source_path) if self.source_path is not None else str(self.settings.value("open_dir", ""))
        path, _ = QFileDialog.getOpenFileName(
            self, "Reuse the parameters of an image", start, "Images (*.png *.jpg *.jpeg *.webp)"
        )
        if path:
            self.reuse_file(path)

    def reuse_file(self, path: str | Path) -> bool:
        """Fill the task, form, panel and seed from the difftool or A1111 record in the image at ``path``.

        The file may come from anyone: its ``allow_pickle`` is never taken, and the files it names are
        listed for the user to fill or leave out (only those that exist here are offered).
        """
        from difftool.core.errors import DifftoolError
        from difftool.gui import dialogs

        name = Path(path).name
        try:
            meta = read_metadata(path)
        except DifftoolError as error:
            self.show_error(str(error))
            return False
        record, a1111 = meta.get("difftool") or {}, meta.get("parameters") or {}
        if not record and not a1111:
            self.show_error(f"{name} holds no parameters to reuse (it was not made by difftool or A1111)")
            return False
        task = record.get("task") or a1111.get("difftool task")
        params = self.registry.task(task).params if task in self.registry.tasks else self.form.task.params
        labels = {entry.label: key for key, entry in self.registry.schedulers.items()}
        reuse = plan_reuse(record, a1111, params, trusted=False, sampler_labels=labels)
        with_files = False
        if reuse.files:
            answer = dialogs.ask_reuse_files(self, name, reuse.files, reuse.missing)
            if answer is None:
                return False
            with_files = answer
        notes = self.apply_reuse(reuse, with_files)
        if str(record.get("allow_pickle", "")).lower() in ("1", "true", "yes"):
            notes.append('"allow pickle" is never taken from a file: tick it yourself if you trust its files')
        self.statusBar().showMessage(f"reused the parameters of {name}; " + "; ".join(notes), 15_000)
        return True

    def apply_reuse(self, reuse: Reuse, with_files: bool) -> list[str]:
        """Set the task, then every field ``reuse`` holds and the task's defaults for the others; the
        panel's model, backend, device, precision and seed. Returns what could not be set, in words."""
        if reuse.task in self.registry.tasks:
            self.task_box.setCurrentText(reuse.task)
        form = self.form
        form.reset()
        notes = []
        values = reuse.values if with_files else reuse.without_files
        for key, value in values.items():
            if key not in form.widgets:
                continue
            try:
                form.set_values({key: value})
            except (TypeError, ValueError):
                notes.append(f'"{key.replace("_", " ")}" {value!r} does not fit this form: left at its default')
        left_out = [] if with_files else [k for k in reuse.files if k not in reuse.without_files]
        for key in left_out:
            notes.append(f'"{key.replace("_", " ")}" left empty (its file was not filled)')
        for key, gone in reuse.missing.items():
            label = key.replace("_", " ")
            if any("painted" in g for g in gone):
                notes.append(f'"{label}": the image it used was painted; paint it or choose it again')
            else:
                notes.append(f'"{label}" left out: {", ".join(gone)} is not a file here')
        notes += self.task_panel.apply_options(reuse.options)
        return notes
