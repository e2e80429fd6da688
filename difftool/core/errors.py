"""The error types difftool raises on purpose.

Every message is one line that names the problem and the fix. The CLI prints ``str(error)`` and
exits with :func:`exit_code`: 2 for usage errors (:class:`ParameterError`: an option, argument or
path on the command line is wrong), 1 for everything else (models, images, outputs, backends,
plugins). Anything that is not a :class:`DifftoolError` is a bug and prints a traceback with --debug.
"""

from __future__ import annotations


class DifftoolError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


class ParameterError(DifftoolError, ValueError):
    """A task parameter is missing, of the wrong type or out of range."""


class ImageError(DifftoolError):
    """An input image cannot be read: missing, not an image, unsupported, truncated."""


class ImageTooLargeError(ImageError):
    """An image (input or planned output) is over the pixel limit; refused before decoding."""


class ModelError(DifftoolError):
    """A model is missing, of an unknown kind, or its weights do not fit."""


class PluginError(DifftoolError):
    """A plugin failed to load, registered something twice, or raised inside a hook."""


class BackendUnavailableError(DifftoolError):
    """The requested backend or device cannot run on this machine."""


class OutputError(DifftoolError):
    """An output location cannot be written (permissions, a file where a folder should be, read-only)."""


class OutputExistsError(OutputError):
    """An output file exists and --overwrite was not given."""


class Cancelled(DifftoolError):
    """The run was cancelled through its :class:`~difftool.core.task.CancelToken`."""

    def __init__(self, problem: str = "cancelled") -> None:
        super().__init__(problem)


def exit_code(error: DifftoolError) -> int:
    """The command line's exit status for ``error``: 2 for usage errors, 1 for the rest."""
    return 2 if isinstance(error, ParameterError) else 1
