"""The server's :class:`~difftool.app.api.Sink`: a job's runs as PNG bytes, for the local queue and the Ray replicas.

Previews become PNG bytes; results become the PNG files the CLI writes (its metadata included), with the
server's paths taken out of the record; a failure becomes one event the job's state is set from.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from difftool.core.errors import Cancelled, DifftoolError
from difftool.serve.errors import without_paths

if TYPE_CHECKING:
    from difftool.app.api import Item, RunResult

log = logging.getLogger("difftool.serve")


def png_bytes(image: Any, record: dict[str, Any] | None = None) -> bytes:
    """A PIL image as PNG bytes (previews, and the A1111 routes' unchanged or resized results); with ``record``,
    written by the CLI's writer (its metadata included): the bytes of the file ``difftool run`` writes."""
    if record is None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    import tempfile
    from pathlib import Path

    from difftool.core.images import save_image

    with tempfile.TemporaryDirectory(prefix="difftool-run-") as folder:
        path = Path(folder) / "out.png"
        save_image(image, path, record)
        return path.read_bytes()


def public(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without the server's paths: a resolved model, LoRA, VAE or file keeps only its name.

    Requests name models by name (or inside --allow-path); the task recorded the resolved path, which
    would tell every client the server's folder layout. Prompts are left as written.
    """
    return {
        key: without_paths(value) if isinstance(value, str) and "prompt" not in key else value
        for key, value in record.items()
    }


#: What :class:`PngSink` sends: ``("step", step, total, preview PNG or None)``, ``("done", [PNG bytes], record)``,
#: ``("cancelled",)`` or ``("error", message, error type)``.
Event = tuple[Any, ...]


class PngSink:
    """Sends each run of a server job to ``send`` as events (see :data:`Event`); ``label`` names the job in
    the log of an unexpected error (a task's bug, out of memory: it fails its job, not the server)."""

    def __init__(self, send: Callable[[Event], None], label: str = "job") -> None:
        self.send, self.label = send, label
        self.item: Item | None = None

    def started(self, item: Item) -> bool:
        self.item = item
        return True

    def progress(self, step: int, total: int, preview: Any) -> None:
        self.send(("step", step, total, None if preview is None else png_bytes(preview)))

    def finished(self, item: Item, result: RunResult) -> None:
        record = public(result.record)  # no server paths in what clients get
        self.send(("done", [png_bytes(image, record) for image in result.images], record))

    def failed(self, item: Item | None, error: BaseException) -> None:
        if isinstance(error, Cancelled):
            self.send(("cancelled",))
        elif isinstance(error, DifftoolError):
            self.send(("error", str(error), type(error).__name__))
        elif isinstance(error, Exception):
            log.error("%s failed", self.label, exc_info=error)
            self.send(("error", f"unexpected error: {type(error).__name__}: {error}", type(error).__name__))
