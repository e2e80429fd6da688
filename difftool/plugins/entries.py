"""What a registry records besides the values themselves: the common option names no task parameter may take,
entries with more than a value and a plugin (schedulers, preprocessors), plugins and their failures."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from difftool.core.task import Entry

#: Option names every ``difftool run`` command has; a task parameter may not take one.
COMMON_OPTIONS = frozenset(
    {
        "model",
        "backend",
        "device",
        "dtype",
        "seed",
        "output",
        "overwrite",
        "json",
        "debug",
        "inputs",
        "help",
        "batch_count",
        "executor",
        "address",
        "workers",
        "gpus_per_worker",
        "backend_opt",
        "backend_options",
        # difftool.run()'s own keywords
        "progress",
        "preview_every",
        "cancel",
        "registry",
        "phase",
    }
)


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that failed to import, or raised or registered wrongly in a hook."""

    plugin: str
    stage: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} failed in {self.stage}: {self.error}"


@dataclass
class PluginInfo:
    name: str
    builtin: bool
    version: str = ""
    registered: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SchedulerEntry(Entry[Callable[[Mapping[str, Any]], Any]]):
    """A scheduler: ``value`` is its factory (noise schedule config -> scheduler)."""

    name: str = ""
    label: str = ""
    summary: str = ""


@dataclass(frozen=True)
class PreprocessorEntry(Entry[Callable[..., Any]]):
    """A ControlNet preprocessor: ``value`` is its function (rgb, mask, **options -> control image)."""

    name: str = ""
    summary: str = ""
    options: tuple[Any, ...] = ()
