"""difftool: diffusion models on images, offline and scriptable.

``import difftool`` is cheap: torch, diffusers and every backend load only when a task runs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Nothing in difftool may reach a model hub; respect a user's explicit setting, default to offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:  # the installed distribution's version (a wheel, an editable checkout), so bug reports say what ran
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("difftool")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from difftool.app.api import RunResult
    from difftool.plugins.registry import Registry

__all__ = ["__version__", "run", "get_registry"]


def run(task: str, *inputs: Any, **params: Any) -> RunResult:
    """Run ``task`` on ``inputs`` with ``params``; see :func:`difftool.app.api.run`."""
    from difftool.app.api import run as _run

    return _run(task, *inputs, **params)


def get_registry() -> Registry:
    """The default plugin registry (built-ins plus installed plugins); see :mod:`difftool.plugins`."""
    from difftool.plugins.registry import get_registry as _get

    return _get()
