"""One preflight per request: resolve and check task, model, backend, device, dtype and parameters once.

:func:`preflight` turns a request into a :class:`Plan` holding the task instance, the backend already
checked for the device (a :class:`~difftool.core.backend.ResolvedBackend`) and the validated
parameters. The CLI, the GUI, :func:`difftool.run`, folder jobs and Ray actors all run plans; the task
receives the resolved backend, so nothing below the preflight looks anything up by name again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from difftool.core.backend import ResolvedBackend
from difftool.core.devices import resolve_dtype
from difftool.core.errors import ModelError, ParameterError
from difftool.core.task import Param, RegistryView, Task

#: What the defaults of backend, device and dtype are; a task that uses no model runs with these.
DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_DTYPE = "torch", "cpu", "auto"


@dataclass
class Plan:
    """A checked request: run it with :func:`difftool.api.execute` (any number of inputs, one preflight)."""

    task_name: str
    task: Task
    plugin: str
    backend: ResolvedBackend
    model: str | None
    #: Validated, typed parameters; image parameters stay as given (loaded per run).
    params: dict[str, Any]
    registry: RegistryView = field(repr=False)

    def request_fields(self) -> dict[str, Any]:
        """The request as plain values, to preflight the same plan in another process (a Ray actor)."""
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


def validate_params(task: Task, params: Mapping[str, Any], registry: RegistryView) -> dict[str, Any]:
    """Apply defaults, convert and range-check ``params`` against the task's declaration."""
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
        values[name] = param.validate(params.get(name, param.default), choices)
    return values


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
) -> Plan:
    """Check the request once and resolve it into a :class:`Plan`, or raise a one-line error."""
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
    return Plan(task, instance, registry.task_plugin(task), resolved, model, values, registry)
