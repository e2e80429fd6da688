"""Model sources: where difftool finds models on disk for ``difftool models`` and ``--model NAME``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path


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
