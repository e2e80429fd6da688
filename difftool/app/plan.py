"""One preflight per request: resolve and check task, model, backend, device, dtype and parameters once.

:func:`preflight` turns a request into a :class:`Plan` holding the task instance, the backend already
checked for the device (a :class:`~difftool.core.backend.ResolvedBackend`) and the validated
parameters. The CLI, the GUI, :func:`difftool.run`, folder jobs and Ray actors all run plans; the task
receives the resolved backend, so nothing below the preflight looks anything up by name again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftool.core.backend import ResolvedBackend
from difftool.core.devices import resolve_dtype
from difftool.core.errors import ModelError, ParameterError
from difftool.core.models import ModelRef
from difftool.core.params import Params, Resolver, resolve_value
from difftool.core.task import Param, RegistryView, Task

if TYPE_CHECKING:
    from difftool.plugins.registry import Registry

#: What the defaults of backend, device and dtype are; a task that uses no model runs with these.
DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_DTYPE = "torch", "cpu", "auto"


@dataclass
class Plan:
    """A checked request: run it with :func:`difftool.app.api.execute` (any number of inputs, one preflight)."""

    task_name: str
    task: Task
    plugin: str
    backend: ResolvedBackend
    #: The task's model, resolved against its ``model_families`` (a :class:`ModelRef`; ``None``: its default).
    model: str | None
    #: Validated, typed, frozen parameters: every declared name present, defaults applied; image parameters
    #: stay as given (loaded per run, :func:`difftool.app.api.prepare`).
    params: Params
    registry: RegistryView = field(repr=False)

    def request_fields(self) -> dict[str, Any]:
        """The request as plain values, to preflight the same plan in another process (a Ray actor); none for a
        task that loads no model (it runs on the defaults, and takes no backend options)."""
        if not self.task.uses_model:
            return {}
        return {
            "model": self.model,
            "backend": self.backend.name,
            "device": self.backend.device,
            "dtype": self.backend.dtype,
            "backend_options": dict(self.backend.options),
        }


def param_choices(param: Param, registry: RegistryView) -> tuple[Any, ...]:
    """A choice parameter's allowed values (schedulers come from the registry)."""
    if param.choices_from == "schedulers":
        return tuple(registry.schedulers)
    return param.choices


class LocalResolver:
    """:class:`~difftool.core.params.Resolver` on this machine: models through the registry's one resolver,
    files as given (they must exist)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def model(self, name: str, families: Sequence[str], what: str) -> str:
        if isinstance(name, ModelRef):  # resolved already (a plan preflighted again in a worker)
            return name
        return ModelRef(name, self.registry.resolve_model(str(name), families, what=what))

    def file(self, path: str | Path, what: str) -> Path:
        found = Path(path).expanduser()
        if not found.exists():
            raise ParameterError(f"{what} {path} does not exist", f"pass an existing file as the {what}")
        return found


def resolve_params(task: Task, values: Mapping[str, Any], resolver: Resolver) -> Params:
    """Validated ``values`` with every model parameter and structured value's names resolved, once."""
    return Params({p.name: resolve_value(p, values[p.name], resolver) for p in task.params})


def validate_params(task: Task, params: Mapping[str, Any], registry: RegistryView) -> Params:
    """Apply defaults, convert and range-check ``params`` against the task's declaration: every declared name
    is present in the result (a task reads ``params.steps``, never ``params.get("steps", 25)``)."""
    declared = {p.name: p for p in task.params}
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ParameterError(
            f"task {task.name!r} has no parameter {unknown[0]!r}",
            f"its parameters are: {', '.join(declared) or 'none'}",
        )
    values: dict[str, Any] = {}
    for name, param in declared.items():
        choices = param_choices(param, registry) if param.type == "choice" else None
        given = params.get(name)  # the request's raw mapping; None (JSON null, an empty form field): the default
        values[name] = param.validate(param.default if given is None else given, choices)
    return Params(values)


def preflight(
    task: str,
    *,
    model: str | None = None,
    backend: str = DEFAULT_BACKEND,
    device: str = DEFAULT_DEVICE,
    dtype: str = DEFAULT_DTYPE,
    backend_options: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    registry: RegistryView | None = None,
    resolver: Resolver | None = None,
) -> Plan:
    """Check the request once and resolve it into a :class:`Plan`, or raise a one-line error.

    The task's cross-field checks (:meth:`Task.check`) and backend checks run here, before any model loads.
    ``resolver`` resolves the models and files the request names (default: :class:`LocalResolver`; a server
    passes its path policy).
    """
    from difftool.plugins.registry import get_registry

    registry = registry or get_registry()
    instance = registry.task(task)
    if not instance.uses_model:
        given = {"model": model, "backend": backend != DEFAULT_BACKEND, "backend_options": backend_options}
        extra = next((name for name, value in given.items() if value), None)
        if extra is not None:
            raise ParameterError(f"task {task!r} uses no model, so it takes no {extra}", f"drop {extra}")
        backend, device, dtype = DEFAULT_BACKEND, DEFAULT_DEVICE, "fp32"
    reason = instance.availability(model)
    if reason:
        raise ModelError(f"task {task!r} cannot run: {reason}")
    resolved = registry.backend(backend).resolve(device, resolve_dtype(dtype, device), backend_options)
    values = validate_params(instance, params or {}, registry)
    instance.check(values)
    instance.check_backend(values, resolved)
    # Then the models and files the request names, once: against the families each is declared with (the
    # task's own model against its model_families); the plan carries what they resolved to.
    resolver = resolver or LocalResolver(registry)
    if model and model not in instance.model_keywords:
        families = instance.model_families  # None: any; else its own and those a family plugin runs it for
        families = () if families is None else (*families, *registry.delegated_families(task))
        model = resolver.model(model, families, "model")
        values = family_defaults(instance, values, params or {}, model, registry)
    values = resolve_params(instance, values, resolver)
    return Plan(task, instance, registry.task_plugin(task), resolved, model, values, registry)


def family_defaults(task: Task, values: Params, given: Mapping[str, Any], model: str, registry: RegistryView) -> Params:
    """``values`` with the model family's own defaults (:meth:`~difftool.core.family.ModelFamily.defaults`)
    in place of the declared ones, for the parameters the request left unset: resolved here, once."""
    family = registry.family_for(model.path, task.name) if isinstance(model, ModelRef) else None
    if family is None:
        return values
    declared = {p.name: p for p in task.params}
    own = family.defaults(family.detect(model.path) or "", task.name)
    unset = {k: declared[k].validate(v) for k, v in own.items() if k in declared and given.get(k) is None}
    return values.replace(**unset) if unset else values
