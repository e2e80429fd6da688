"""What a run is doing when it is not stepping: loading a model, exporting, building an engine.

Those phases can take longer than the sampling itself (the first ONNX run exports for many seconds), so
the app that started the run shows them. Code deep inside a loader or an exporter calls :func:`announce`;
whoever runs the task listens with :func:`listening`. The listener is held in a context variable, so
concurrent runs on other threads (the GUI's worker, a server's workers) each hear only their own.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

#: ``(what, done, total)``: ``done``/``total`` are ``None`` when the phase cannot measure itself.
PhaseCallback = Callable[[str, "int | None", "int | None"], None]

_LISTENER: contextvars.ContextVar[PhaseCallback | None] = contextvars.ContextVar("difftool_phase", default=None)


def announce(what: str, done: int | None = None, total: int | None = None) -> None:
    """Tell the current run's listener (if any) what is happening, e.g. ``"loading model 4x-foo"``."""
    listener = _LISTENER.get()
    if listener is not None:
        listener(what, done, total)


def listener() -> PhaseCallback | None:
    """The current listener, for work handed to another thread (TensorRT's builder calls back from its own)."""
    return _LISTENER.get()


@contextlib.contextmanager
def listening(callback: PhaseCallback | None) -> Iterator[None]:
    """Send the phases announced inside the block (on this thread) to ``callback`` (``None``: leave the
    current listener in place, so a caller's listener hears the runs it makes)."""
    token = _LISTENER.set(callback or _LISTENER.get())
    try:
        yield
    finally:
        _LISTENER.reset(token)
