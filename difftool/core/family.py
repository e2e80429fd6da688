"""The ModelFamily interface: a model architecture a plugin brings to tasks declared elsewhere.

A task such as ``generate`` is declared once (its parameters become the CLI's options and the GUI's
fields). A plugin that teaches difftool another architecture registers a :class:`ModelFamily` through
the ``register_families`` hook; when ``--model`` names a model the family recognises, a task that
delegates (the Stable Diffusion ``generate`` task does) hands the whole run to :meth:`ModelFamily.run`.
Core names no family: difftool's own transformer families arrive as such a plugin.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from difftool.core.task import RunContext, TaskRequest, TaskResult


class ModelFamily(ABC):
    """Detects its models on disk and runs the tasks it names for them."""

    #: Unique id (``difftool plugins`` lists it).
    name: ClassVar[str]
    #: The family names :meth:`detect` returns (what ``difftool models`` shows).
    families: ClassVar[tuple[str, ...]]
    #: The task names it runs for its models.
    tasks: ClassVar[tuple[str, ...]]
    #: Whether it reads a task's ``reference`` images itself (Flux Redux) rather than leave them to the
    #: task's own image-prompt adapter (Stable Diffusion's IP-Adapter), which then refuses its models.
    takes_reference: ClassVar[bool] = False

    @abstractmethod
    def detect(self, path: Path) -> str | None:
        """The family of the model file or folder at ``path``, or ``None`` if it is not one of these.
        Cheap: read a header or a config, never the weights."""

    def defaults(self, family: str, task: str) -> Mapping[str, Any]:
        """The family's own values for ``task``'s parameters a request leaves unset (Flux.1 schnell: 4 steps),
        applied once by the preflight in place of the declared defaults. None by default."""
        return {}

    @abstractmethod
    def run(self, task: str, request: TaskRequest, context: RunContext) -> TaskResult:
        """Run ``task`` (one of :attr:`tasks`) with ``context.model``, its parameters validated against the
        task's declaration; report progress and honour cancellation through ``context`` as any task does."""
