"""Declared parameters as click options: task parameters, and plugin commands' declared options."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import click

from difftool.core.task import Param

if TYPE_CHECKING:
    from difftool.plugins.registry import Registry


def context_registry(ctx: click.Context | None = None) -> Registry:
    """The registry a ``difftool`` command runs with: the root context's ``obj`` (tests and embedders pass
    their own: ``cli.main(obj=registry)``, ``CliRunner().invoke(cli, args, obj=registry)``), else the
    runtime's :func:`~difftool.plugins.registry.get_registry`, kept there for the rest of the invocation."""
    root = (ctx or click.get_current_context()).find_root()
    if root.obj is None:
        from difftool.plugins.registry import get_registry

        root.obj = get_registry()
    return root.obj


def param_option(param: Param, choices: Sequence[Any] | None = None) -> click.Option:
    """The click option for ``param``; ``choices`` overrides its declared ones (a registry's schedulers)."""
    kwargs: dict[str, Any] = {"help": param.help, "required": param.required, "show_default": param.default is not None}
    flags = ["-o", param.flag] if param.name == "output" else [param.flag]  # -o, as every difftool command
    if param.type == "bool":
        name = param.name.replace("_", "-")
        return click.Option([f"--{name}/--no-{name}", param.name], default=bool(param.default), **kwargs)
    default = param.effective_default()  # a declared option's environment variable, when set
    if param.type == "int":
        kwargs["type"] = click.IntRange(param.min, param.max)
    elif param.type == "float":
        kwargs["type"] = click.FloatRange(param.min, param.max)
    elif param.type == "choice":
        allowed = param.choices if choices is None else choices
        kwargs["type"] = click.Choice([str(c) for c in allowed])  # typed back when validated
        default = None if default is None else str(default)
    elif param.type in ("image", "mask"):
        kwargs["type"] = click.Path(exists=True, dir_okay=False)
    elif param.type == "path":
        kwargs["type"] = click.Path()
    else:
        kwargs["type"] = str
    if param.multiple:  # repeatable: --control A --control B
        return click.Option([*flags, param.name], default=default, multiple=True, **kwargs)
    return click.Option([*flags, param.name], default=default, **kwargs)


@contextlib.contextmanager
def click_errors() -> Iterator[None]:
    """Turn difftool's one-line errors into click's (message, exit 1)."""
    from difftool.core.errors import DifftoolError

    try:
        yield
    except DifftoolError as error:
        raise click.ClickException(str(error)) from None
