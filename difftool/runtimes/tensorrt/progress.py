"""A TensorRT build's progress: its builder phases as a progress bar, and a cancel that stops the build."""

from __future__ import annotations

from typing import Any

from difftool.core import phases


class BuildProgress:
    """Turns TensorRT's builder phases into a progress bar (driven by :class:`IProgressMonitor`).

    Top-level phases get a bar each; nested phases only update the bar's description. Returning
    ``False`` from :meth:`step_complete` asks TensorRT to cancel the build.
    """

    def __init__(self, file: Any = None, cancelled: Any = None) -> None:
        self.file = file
        self.cancelled = cancelled or (lambda: False)
        self.bars: dict[str, Any] = {}
        self.parents: dict[str, str | None] = {}
        self.totals: dict[str, int] = {}
        # Captured here, on the run's thread: TensorRT calls the monitor from its own threads.
        self.listener = phases.listener()

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        from tqdm import tqdm

        self.parents[phase_name] = parent_phase
        if parent_phase is None:
            self.totals[phase_name] = num_steps
            if self.listener is not None:
                self.listener(f"building TensorRT engine: {phase_name}", 0, num_steps)
            self.bars[phase_name] = tqdm(total=num_steps, desc=f"TensorRT {phase_name}", file=self.file, leave=False)
        else:
            top = self._top(phase_name)
            if top in self.bars:
                self.bars[top].set_postfix_str(phase_name)

    def step_complete(self, phase_name: str, step: int) -> bool:
        if phase_name in self.bars:
            bar = self.bars[phase_name]
            bar.update(step + 1 - bar.n)
            if self.listener is not None:
                self.listener(f"building TensorRT engine: {phase_name}", step + 1, self.totals[phase_name])
        return not self.cancelled()

    def phase_finish(self, phase_name: str) -> None:
        bar = self.bars.pop(phase_name, None)
        if bar is not None:
            bar.close()
        self.parents.pop(phase_name, None)

    def _top(self, phase: str) -> str:
        while self.parents.get(phase) is not None:
            phase = self.parents[phase]  # type: ignore[assignment]
        return phase


def progress_monitor(trt: Any, progress: BuildProgress) -> Any:
    """A ``trt.IProgressMonitor`` delegating to ``progress`` (TensorRT calls it from its own threads)."""

    class Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return progress.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            progress.phase_finish(phase_name)

    return Monitor()
