"""How the window runs jobs: builds them from the form, queues and cancels them, and shows each job's
phases, steps, previews and result (a mixin of :class:`~difftool.gui.app.MainWindow`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QListWidgetItem

from difftool.gui.convert import pil_to_qimage
from difftool.gui.job_queue import Job
from difftool.gui.prompt_tools import remember_prompts

#: Ended jobs kept in the queue's list, after the queued and running ones (each says how it ended).
ENDED_ROWS = 4


class JobActions:
    """Running for the main window (which provides the form, the task panel, the queue and the canvas)."""

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
        remember_prompts(self.settings, task.name, params)
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
        for widget in self.form.widgets.values():  # a field's own checks (a ControlNet unit without a model)
            for message, field in getattr(widget, "problems", lambda: [])():
                self.show_error(message, outline=[field])
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
        """The queue's rows: every queued and running job, and the last few that ended (a cancelled job's row
        says "cancelled" instead of vanishing)."""
        jobs = list(self.queue.jobs.values())
        ended = [job.id for job in jobs if job.state not in ("queued", "running")][-ENDED_ROWS:]
        rows = [job for job in jobs if job.state in ("queued", "running") or job.id in ended]
        # Rows are updated in place, never cleared and made again: QListWidget.clear() deleting items whose
        # Python wrappers PySide still tracks crashed the app after a few dozen jobs (PySide6 6.11).
        listed = self.queue_list
        while listed.count() > len(rows):
            listed.takeItem(listed.count() - 1)
        while listed.count() < len(rows):
            listed.addItem(QListWidgetItem())
        for index, job in enumerate(rows):
            item = listed.item(index)
            item.setText(job.label())
            item.setToolTip(job.label())  # the whole text, however narrow the panel
            item.setData(Qt.ItemDataRole.UserRole, job.id)
        running = self.queue.jobs.get(self.queue.running) if self.queue.running is not None else None
        self.status.running(running is not None, running is not None and running.token.cancelled)

    def _on_cancelling(self, job_id: int) -> None:
        job = self.queue.jobs[job_id]
        self.status.cancelling(job)
        self._update_row(job)

    def _update_row(self, job: Job) -> None:
        """The job's queue row names what it is doing now (its phase, its step)."""
        for index in range(self.queue_list.count()):
            item = self.queue_list.item(index)
            if item.data(Qt.ItemDataRole.UserRole) == job.id:
                item.setText(job.label())
                item.setToolTip(job.label())

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
        if job.batch:
            self.status.batch_progress(self.batch_jobs(job.batch))
        if job.state == "done":
            if job.task == self.form.task.name:
                self.highlight([])  # the problem an outline marked is fixed: this task ran
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
        reference = self.history_list.reference
        if reference is not None and reference is not job:  # A/B: two results side by side
            before, labels = pil_to_qimage(reference.result.image), (_label(reference), _label(job))
        else:
            before, labels = self._before(job), ("before", "after")
        self.canvas.compare_labels = labels
        self.canvas.set_result(pil_to_qimage(image), before)
        origin = f" (from {job.source_name})" if job.source_name else ""
        self.status.showing(f"result of #{job.id} {job.task} — {image.width}×{image.height}{origin}")


def _label(job: Job) -> str:
    """A result's caption on the A/B divider: its number and seed (what usually differs between two)."""
    seed = job.result.record.get("seed")
    return f"#{job.id} seed {seed}" if seed is not None else f"#{job.id}"
