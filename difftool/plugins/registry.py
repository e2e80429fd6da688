"""Builds a :class:`Registry` of tasks, schedulers, backends and model sources from plugins.

``build_registry()`` is a factory: tests build one with exactly the plugins they pass in, the CLI and
API share :func:`get_registry`. Entry points are loaded one by one, so one broken plugin is reported
(``difftool plugins``) while the others keep working.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pluggy

from difftool.core.backend import Backend
from difftool.core.errors import BackendUnavailableError, ModelError, ParameterError, PluginError
from difftool.core.exporter import Exporter
from difftool.core.family import ModelFamily
from difftool.core.models import ModelEntry, ModelSource
from difftool.core.task import Entry, Task
from difftool.plugins import hookspecs
from difftool.plugins.entries import (  # noqa: F401 - importers find them here too
    COMMON_OPTIONS,
    PluginFailure,
    PluginInfo,
    PreprocessorEntry,
    SchedulerEntry,
)

ENTRY_POINT_GROUP = "difftool"
#: Built-in plugins, registered exactly as third-party ones are (by module, through the same hooks).
DEFAULT_PLUGINS: tuple[str, ...] = (
    "difftool.plugins.builtin.schedulers",
    "difftool.plugins.builtin.backends",
    "difftool.plugins.builtin.exporters",
    "difftool.plugins.builtin.models",
    "difftool.plugins.builtin.superres",
    "difftool.plugins.builtin.inpaint",
    "difftool.plugins.builtin.sd.tasks",
    "difftool.plugins.builtin.sd.upscale_sd",
    "difftool.plugins.builtin.sd.preprocessors",
    "difftool.plugins.builtin.flow.plugin",
)
class Registry:
    """What the installed plugins provide, and who provided it."""

    def __init__(self) -> None:
        self.tasks: dict[str, Entry[type[Task]]] = {}
        self.schedulers: dict[str, SchedulerEntry] = {}
        self.backends: dict[str, Entry[Backend]] = {}
        self.exporters: dict[str, Entry[Exporter]] = {}
        self.model_sources: dict[str, Entry[ModelSource]] = {}
        self.preprocessors: dict[str, PreprocessorEntry] = {}
        self.families: dict[str, Entry[ModelFamily]] = {}
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[PluginFailure] = []
        self.plugin_manager: pluggy.PluginManager | None = None
        #: How it was built, so another process (a Ray worker) can build the same one.
        self.entry_points = True
        self.plugin_modules: tuple[str, ...] = ()

    # --- lookups ----------------------------------------------------------------------------------
    def task(self, name: str) -> Task:
        """A fresh instance of task ``name``."""
        entry = self.tasks.get(name)
        if entry is None:
            known = ", ".join(sorted(self.tasks)) or "none"
            if self.failures:  # the task may be the broken plugin's: say which failed and why
                failed = "; ".join(str(f) for f in self.failures[:3])
                raise PluginError(
                    f"unknown task {name!r} (available: {known}); {failed}",
                    "fix or reinstall that plugin (`difftool plugins` lists failures)",
                )
            raise ParameterError(f"unknown task {name!r} (available: {known})", "run `difftool tasks` to list them")
        return entry.value()

    def make_scheduler(self, name: str, config: Mapping[str, Any]) -> Any:
        entry = self.schedulers.get(name)
        if entry is None:
            known = ", ".join(sorted(self.schedulers))
            raise ParameterError(f"unknown scheduler {name!r}", f"use one of {known}")
        return entry.value(config)

    def backend(self, name: str) -> Backend:
        """Backend ``name`` (unchecked: :meth:`Backend.resolve` checks it for a device, once, in the preflight)."""
        found = self.backends.get(name)
        if found is None:
            known = ", ".join(sorted(self.backends))
            raise BackendUnavailableError(f"unknown backend {name!r}", f"use one of {known}")
        return found.value

    def find_models(self) -> list[ModelEntry]:
        """Models every source lists; a source that raises is recorded as a failure and skipped."""
        models: list[ModelEntry] = []
        for entry in self.model_sources.values():
            try:
                models.extend(entry.value.find())
            except Exception as exc:  # noqa: BLE001 - one broken source must not hide the others
                self.failures.append(PluginFailure(entry.plugin, f"model source {entry.value.name!r}", _one_line(exc)))
        return [self._with_family(found) for found in models]

    def _with_family(self, entry: ModelEntry) -> ModelEntry:
        """An entry the sources could not place, named by the registered family that recognises it."""
        if self.families and entry.family in ("unknown", "unsupported checkpoint", "diffusers-pipeline"):
            for family in self.families.values():
                found = family.value.detect(entry.path)
                if found:
                    return dataclasses.replace(entry, family=found)
        return entry

    def resolve_model(
        self, name: str, families: Sequence[str] = (), *, what: str = "model", paths: bool = True
    ) -> Path:
        """The file or folder model ``name`` names (the one resolver): an existing file or folder (if ``paths``;
        a server applies its own policy), else a name ``difftool models`` lists among ``families`` (empty: any);
        otherwise a one-line :class:`ModelError` naming the fix and the listed choices of those families."""
        if paths:
            path = Path(name).expanduser()
            if path.exists():
                if not (path.is_file() or path.is_dir()):  # a FIFO's open() would block the run forever
                    raise ModelError(f"{what} {name!r} is not a regular file or folder", "name a model file or folder")
                return path
        listed = self.find_models()
        fits = [e for e in listed if not families or e.family in families]
        found = next((e for e in fits if e.name == name), None)
        if found is not None:
            return found.path
        choices = ", ".join(sorted({e.name for e in fits})[:20]) or "none found"
        other = next((e for e in listed if e.name == name), None)
        if other is not None:
            raise ModelError(
                f"{what} {name!r} is a {other.family} model, not {' or '.join(families)} (listed: {choices})",
                "pass one of the listed models of those families (`difftool models` shows each one's family)",
            )
        raise ModelError(f"{what} {name!r} not found (listed: {choices})", "pass a file or folder, or a listed name")

    def preprocessor(self, name: str) -> PreprocessorEntry:
        entry = self.preprocessors.get(name)
        if entry is None:
            known = ", ".join(sorted(self.preprocessors)) or "none"
            raise ParameterError(f"unknown ControlNet preprocessor {name!r}", f"use one of {known}")
        return entry

    def delegated_families(self, task: str) -> tuple[str, ...]:
        """The model families registered families run ``task`` for (SD 3.5 and Flux for ``generate``)."""
        return tuple(f for entry in self.families.values() if task in entry.value.tasks for f in entry.value.families)

    def family_for(self, path: Any, task: str) -> ModelFamily | None:
        """The registered family that recognises the model at ``path`` and runs ``task`` for it, if any."""
        for entry in self.families.values():
            if task in entry.value.tasks and entry.value.detect(path):
                return entry.value
        return None

    def task_plugin(self, name: str) -> str:
        return self.tasks[name].plugin

    # --- registration -----------------------------------------------------------------------------
    def _record(self, plugin: str, what: str) -> None:
        self.plugins.setdefault(plugin, PluginInfo(plugin, builtin=False)).registered.append(what)

    def _register_task(self, plugin: str, cls: type[Task]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise PluginError(f"register_tasks got {cls!r}, not a Task subclass")
        for attr in ("name", "summary"):
            if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
                raise PluginError(f"task {cls.__name__} declares no {attr}")
        names = [p.name for p in cls.params]
        if len(set(names)) != len(names):
            raise PluginError(f"task {cls.name!r} declares a parameter twice: {names}")
        clash = COMMON_OPTIONS.intersection(names)
        if clash:
            raise PluginError(f"task {cls.name!r} parameter {sorted(clash)[0]!r} clashes with a common option")
        _check_declarations(f"task {cls.name!r}", plugin, cls.params, tuple(self.schedulers))
        if cls.name in self.tasks:
            raise PluginError(f"task {cls.name!r} is already registered by plugin {self.tasks[cls.name].plugin!r}")
        self.tasks[cls.name] = Entry(cls, plugin)
        self._record(plugin, f"task {cls.name}")

    def _register_scheduler(
        self, plugin: str, name: str, factory: Callable[[Mapping[str, Any]], Any], label: str = "", summary: str = ""
    ) -> None:
        if name in self.schedulers:
            raise PluginError(f"scheduler {name!r} is already registered by plugin {self.schedulers[name].plugin!r}")
        if not callable(factory):
            raise PluginError(f"scheduler {name!r}: factory {factory!r} is not callable")
        self.schedulers[name] = SchedulerEntry(factory, plugin, name, label or name, summary)
        self._record(plugin, f"scheduler {name}")

    def _register_backend(self, plugin: str, backend: Backend) -> None:
        if not isinstance(backend, Backend):
            raise PluginError(f"register_backends got {backend!r}, not a Backend instance")
        for param in backend.options:
            try:
                param.check_declaration()
            except TypeError as error:
                raise PluginError(
                    f"backend {backend.name!r} (plugin {plugin!r}) is declared wrongly: {error}"
                ) from None
        if backend.name in self.backends:
            raise PluginError(
                f"backend {backend.name!r} is already registered by plugin {self.backends[backend.name].plugin!r}"
            )
        self.backends[backend.name] = Entry(backend, plugin)
        self._record(plugin, f"backend {backend.name}")

    def _register_exporter(self, plugin: str, exporter: Exporter) -> None:
        if not isinstance(exporter, Exporter):
            raise PluginError(f"register_exporters got {exporter!r}, not an Exporter instance")
        _check_declarations(f"exporter {exporter.name!r}", plugin, exporter.options)
        if exporter.name in self.exporters:
            raise PluginError(
                f"exporter {exporter.name!r} is already registered by plugin {self.exporters[exporter.name].plugin!r}"
            )
        self.exporters[exporter.name] = Entry(exporter, plugin)
        self._record(plugin, f"exporter {exporter.name}")

    def _register_preprocessor(
        self, plugin: str, name: str, function: Callable[..., Any], summary: str = "", options: Iterable[Any] = ()
    ) -> None:
        if name in self.preprocessors:
            owner = self.preprocessors[name].plugin
            raise PluginError(f"preprocessor {name!r} is already registered by plugin {owner!r}")
        if not callable(function):
            raise PluginError(f"preprocessor {name!r}: function {function!r} is not callable")
        options = tuple(options)
        _check_declarations(f"preprocessor {name!r}", plugin, options)
        self.preprocessors[name] = PreprocessorEntry(function, plugin, name, summary, options)
        self._record(plugin, f"preprocessor {name}")

    def _register_family(self, plugin: str, family: ModelFamily) -> None:
        if not isinstance(family, ModelFamily):
            raise PluginError(f"register_families got {family!r}, not a ModelFamily instance")
        if family.name in self.families:
            raise PluginError(
                f"model family {family.name!r} is already registered by plugin {self.families[family.name].plugin!r}"
            )
        self.families[family.name] = Entry(family, plugin)
        self._record(plugin, f"family {family.name}")

    def _register_model_source(self, plugin: str, source: ModelSource) -> None:
        if not isinstance(source, ModelSource):
            raise PluginError(f"register_models got {source!r}, not a ModelSource instance")
        if source.name in self.model_sources:
            raise PluginError(f"model source {source.name!r} is already registered")
        self.model_sources[source.name] = Entry(source, plugin)
        self._record(plugin, f"models {source.name}")


def _check_declarations(what: str, plugin: str, params: Iterable[Any], schedulers: tuple[str, ...] = ()) -> None:
    """Refuse (``PluginError``, naming the plugin) a declared default that is not a valid value."""
    for param in params:
        try:
            param.check_declaration(schedulers if param.choices_from == "schedulers" else None)
        except TypeError as error:
            raise PluginError(f"{what} (plugin {plugin!r}) is declared wrongly: {error}") from None


def _guarded_globals() -> dict[str, tuple[object, str, object]]:
    """Process-wide settings a plugin must not change: name -> (owner, attribute, current value)."""
    from PIL import Image, ImageFile

    guarded = {
        "PIL.Image.MAX_IMAGE_PIXELS": (Image, "MAX_IMAGE_PIXELS"),
        "PIL.ImageFile.LOAD_TRUNCATED_IMAGES": (ImageFile, "LOAD_TRUNCATED_IMAGES"),
    }
    torch = sys.modules.get("torch")
    if torch is not None:  # never import torch just to guard it
        guarded["torch.load"] = (torch, "load")
    return {name: (owner, attr, getattr(owner, attr)) for name, (owner, attr) in guarded.items()}


def _restore_globals(registry: Registry, plugin: str, before: dict[str, tuple[object, str, object]]) -> None:
    for name, (owner, attr, value) in before.items():
        if getattr(owner, attr) is not value:
            setattr(owner, attr, value)
            registry.failures.append(PluginFailure(plugin, "global state", f"changed {name}; difftool restored it"))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def call_each(registry: Registry, hook_name: str, make_kwargs: Callable[[str], dict[str, Any]]) -> None:
    """Call ``hook_name`` plugin by plugin, in registration order, recording each one's failure."""
    pm = registry.plugin_manager
    assert pm is not None
    caller = getattr(pm.hook, hook_name)
    for impl in caller.get_hookimpls():
        kwargs = make_kwargs(impl.plugin_name)
        before = _guarded_globals()
        try:
            impl.function(*[kwargs[arg] for arg in impl.argnames])
        except Exception as exc:  # noqa: BLE001 - a plugin's bug is reported, never fatal to the rest
            registry.failures.append(PluginFailure(impl.plugin_name, f"hook {hook_name}", _one_line(exc)))
        _restore_globals(registry, impl.plugin_name, before)


def build_registry(plugins: Iterable[object] = (), *, builtins: bool = True, entry_points: bool = True) -> Registry:
    """A registry from the built-ins (if ``builtins``), the ``difftool`` entry points (if ``entry_points``)
    and the plugin objects or module names in ``plugins``, in that order."""
    plugins = list(plugins)
    registry = Registry()
    registry.entry_points = entry_points
    registry.plugin_modules = tuple(p for p in plugins if isinstance(p, str))
    pm = pluggy.PluginManager("difftool")
    pm.add_hookspecs(hookspecs)
    registry.plugin_manager = pm

    def add(plugin: object, name: str, builtin: bool, version: str = "") -> None:
        try:
            pm.register(plugin, name=name)
        except Exception as exc:  # noqa: BLE001 - e.g. a hook with a misspelt argument
            registry.failures.append(PluginFailure(name, "registration", _one_line(exc)))
            return
        registry.plugins.setdefault(name, PluginInfo(name, builtin=builtin, version=version))

    if builtins:
        for module_name in DEFAULT_PLUGINS:
            add(importlib.import_module(module_name), module_name, builtin=True)
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            version = ep.dist.version if ep.dist is not None else ""
            before = _guarded_globals()
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - pluggy's loader stops at the first failure; we go on
                registry.failures.append(PluginFailure(ep.name, "import", _one_line(exc)))
                registry.plugins.setdefault(ep.name, PluginInfo(ep.name, builtin=False, version=version))
                continue
            finally:
                _restore_globals(registry, ep.name, before)
            add(plugin, ep.name, builtin=False, version=version)
    for plugin in plugins:
        if isinstance(plugin, str):
            plugin_name, plugin = plugin, importlib.import_module(plugin)
        else:
            plugin_name = getattr(plugin, "__name__", None) or type(plugin).__name__
        add(plugin, plugin_name, builtin=False)

    def guarded(method: Callable[..., None]) -> Callable[[str], dict[str, Any]]:
        return lambda plugin: {"register": functools.partial(method, plugin)}

    call_each(registry, "register_schedulers", guarded(registry._register_scheduler))
    call_each(registry, "register_backends", guarded(registry._register_backend))
    call_each(registry, "register_models", guarded(registry._register_model_source))
    call_each(registry, "register_exporters", guarded(registry._register_exporter))
    call_each(registry, "register_preprocessors", guarded(registry._register_preprocessor))
    call_each(registry, "register_families", guarded(registry._register_family))
    call_each(registry, "register_tasks", guarded(registry._register_task))
    return registry


def plugins_disabled() -> bool:
    """``DIFFTOOL_NO_PLUGINS=1`` (or ``--no-plugins``) turns third-party plugins off."""
    return os.environ.get("DIFFTOOL_NO_PLUGINS", "").strip().lower() not in ("", "0", "false", "no")


def _default_registry(entry_points: bool) -> Registry:
    registry = build_registry(entry_points=entry_points)
    for failure in registry.failures:
        print(f"warning: {failure}", file=sys.stderr)
    return registry


def get_registry() -> Registry:
    """The runtime's registry: built-ins plus entry-point plugins unless :func:`plugins_disabled`."""
    from difftool.core.runtime import current

    entry_points = not plugins_disabled()
    return current().cache(("registry", entry_points), lambda: _default_registry(entry_points))
