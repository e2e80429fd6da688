"""Model sources: where difftool finds models on disk for ``difftool models`` and ``--model NAME``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from difftool.core.errors import ModelError


@dataclass(frozen=True)
class ModelEntry:
    """A model found on disk: ``name`` is what ``--model`` accepts, ``family`` what it was detected as."""

    name: str
    path: Path
    family: str
    source: str


class ModelSource(ABC):
    """Lists models; registered through the ``register_models`` hook."""

    name: str

    @abstractmethod
    def find(self) -> list[ModelEntry]:
        """Models this source sees now (cheap: read headers and configs, never whole weights)."""


class ModelRef(str):
    """A model parameter's resolved value: the text the request gave (a listed name or a path: what records
    and metadata show, so they read as before) carrying :attr:`path`, the file or folder it names.

    The preflight makes these (:meth:`difftool.plugins.registry.Registry.resolve_model`, or a server's path
    policy), so a run loads ``value.path`` and never looks the name up again.
    """

    path: Path

    def __new__(cls, text: str, path: str | Path) -> ModelRef:
        ref = super().__new__(cls, text)
        ref.path = Path(path)
        return ref

    def __reduce__(self) -> tuple[object, ...]:  # picklable for Ray and worker processes
        return (ModelRef, (str(self), self.path))


class ModelResolver(Protocol):
    """What :func:`model_path` asks of a registry: its one resolver (:meth:`Registry.resolve_model`)."""

    def resolve_model(self, name: str, families: Sequence[str] = (), *, what: str = "model") -> Path: ...


def model_path(
    model: str | Path, registry: ModelResolver | None, families: Sequence[str] = (), what: str = "model"
) -> Path:
    """The file or folder ``model`` names: a :class:`ModelRef`'s path (resolved by the preflight), else what
    the registry's one resolver finds (a task composed by hand, a test building its own context)."""
    if isinstance(model, ModelRef):
        return model.path
    if registry is not None:
        return registry.resolve_model(str(model), families, what=what)
    path = Path(model).expanduser()
    if path.exists():
        return path
    raise ModelError(f"{what} {str(model)!r} not found", "pass a file or folder, or a name `difftool models` lists")
