"""What stays loaded between runs in one process: the plugin registry, models, ONNX Runtime sessions,
TensorRT engines, verified artifact hashes.

One :class:`Runtime` holds them all, so the state has one owner: the process (the CLI, the GUI, a
server), or a test that wants a clean slate (``with using(Runtime()): ...``) instead of patching
module globals. Modules ask :func:`current` for their cache by name.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Current(Generic[T]):
    """A process-wide current value with scoped overrides (the runtime below, the CUDA runtime)."""

    def __init__(self, value: T) -> None:
        self._value = value

    def get(self) -> T:
        return self._value

    def set(self, value: T) -> None:
        self._value = value

    @contextlib.contextmanager
    def using(self, value: T) -> Iterator[T]:
        """``value`` inside the block, the previous one after."""
        previous, self._value = self._value, value
        try:
            yield value
        finally:
            self._value = previous


class Runtime:
    """Named caches, created on first use."""

    def __init__(self) -> None:
        self._caches: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def cache(self, name: Any, factory: Callable[[], T]) -> T:
        """The cache called ``name``, made by ``factory()`` the first time it is asked for.

        ``factory`` runs outside the lock: building the registry runs plugins' hooks, which may ask for
        a cache themselves. If two threads race, the first one stored wins.
        """
        with self._lock:
            if name in self._caches:
                return self._caches[name]
        made = factory()
        with self._lock:
            return self._caches.setdefault(name, made)

    def clear(self) -> None:
        """Drop everything loaded (the next run loads again)."""
        with self._lock:
            self._caches.clear()


_CURRENT = Current(Runtime())


def current() -> Runtime:
    """The runtime in use in this process."""
    return _CURRENT.get()


def using(runtime: Runtime) -> contextlib.AbstractContextManager[Runtime]:
    """Use ``runtime`` inside a ``with`` block (a window's own, or a test's fresh one)."""
    return _CURRENT.using(runtime)
