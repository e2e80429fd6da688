"""The built-in exporters and the ``export`` and ``cache`` commands, registered like any plugin's.

``difftool export FORMAT [TASK]`` has one subcommand per registered exporter (a plugin's too), whose
flags are the exporter's declared options; TASK is any registered task that offers its network for
export (``Task.export_target``), a plugin's included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import click

from difftool.core.exporter import Exporter
from difftool.core.task import RegistryView
from difftool.exporters.formats import OnnxExporter
from difftool.plugins.click_options import click_errors, context_registry, param_option
from difftool.plugins.hookspecs import hookimpl
from difftool.runtimes.tensorrt.exporter import TensorRTExporter
from difftool.runtimes.triton.exporter import TritonExporter


def exportable_tasks(registry: RegistryView) -> list[str]:
    """Tasks that declare :attr:`~difftool.core.task.Task.exports` (their ``export_target`` offers a network)."""
    return sorted(n for n, e in registry.tasks.items() if e.value.exports)


def declared_shapes(task: Any, model: str | None = None) -> Any:
    """The shapes a run of ``model`` with default parameters on a 512x512 input declares (what runs will ask for).

    ``None`` when the task declares none for such a request: the exporter then uses its defaults.
    """
    import numpy as np

    from difftool.core.errors import DifftoolError
    from difftool.core.images import LoadedImage
    from difftool.core.params import Params
    from difftool.core.task import TaskRequest

    blank = LoadedImage(np.zeros((512, 512, 3), np.float32))
    inputs = {port.name: blank for port in task.inputs if port.kind in ("image", "mask")}
    try:
        return task.export_shapes(TaskRequest(inputs, Params({p.name: p.default for p in task.params}), model))
    except (DifftoolError, KeyError, TypeError, ValueError):  # a declaration that needs real inputs
        return None


def exporter_command(exporter: Exporter, registry: RegistryView) -> click.Command:
    """``difftool export NAME [TASK] [--model M] [declared options]``."""
    params: list[click.Parameter] = [
        click.Argument(["task"], required=False),
        click.Option(["--task", "task_option"], help="the task whose network to export (default: superres)"),
        click.Option(["--model"], help="model folder or file (default: the task's embedded one)"),
        *(param_option(p) for p in exporter.options),
    ]

    def callback(task: str | None, task_option: str | None, model: str | None, **values: Any) -> None:
        from difftool.core.errors import ParameterError

        with click_errors():
            if task and task_option and task != task_option:
                raise ParameterError(f"TASK {task!r} and --task {task_option!r} differ", "pass one of them")
            name = task or task_option or "superres"
            instance = registry.task(name)
            exportable = exportable_tasks(registry)
            if name not in exportable:
                raise ParameterError(f"task {name!r} has no network to export", f"use one of {', '.join(exportable)}")
            options = exporter.validate_options({k: v for k, v in values.items() if v is not None})
            reason = exporter.unavailable_reason(options)
            if reason:
                raise click.ClickException(f"cannot export {exporter.name} here: {reason}")
            target = instance.export_target(model)
            if target.shapes is None:
                target = dataclasses.replace(target, shapes=declared_shapes(instance, model))
            result = exporter.export(target, name, options)
        click.echo(str(result.path))
        for line in result.details:
            click.echo(f"  {line}")

    return click.Command(exporter.name, params=params, callback=callback, help=f"Export {exporter.summary}.")


def export_group() -> click.Group:
    """``difftool export NAME``: one subcommand per registered exporter (the invocation's registry's)."""

    class ExportGroup(click.Group):
        def list_commands(self, ctx: click.Context) -> list[str]:
            return sorted(context_registry(ctx).exporters)

        def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
            registry = context_registry(ctx)
            found = registry.exporters.get(cmd_name)
            return exporter_command(found.value, registry) if found else None

    return ExportGroup(
        "export", help="Export a task's denoiser for another runtime (validated against PyTorch, cached)."
    )


@click.group()
def cache() -> None:
    """The artifact cache ($DIFFTOOL_CACHE or ~/.cache/difftool)."""


@cache.command("list")
def cache_list() -> None:
    """List cached artifacts and whether each verifies."""
    from difftool.exporters.cache import ArtifactCache

    with click_errors():
        entries = ArtifactCache().entries()
    for folder, ok in entries:
        click.echo(f"{'ok     ' if ok else 'BROKEN '} {folder}")


@cache.command("verify")
def cache_verify() -> None:
    """Check every artifact against its manifest's hashes; exit 1 if any is broken."""
    from difftool.exporters.cache import ArtifactCache

    with click_errors():
        broken = [folder for folder, ok in ArtifactCache().entries() if not ok]
    for folder in broken:
        click.echo(f"BROKEN {folder} (it will be rebuilt on next use)")
    if broken:
        raise SystemExit(1)
    click.echo("all cached artifacts verify")


@cache.command("clear")
def cache_clear() -> None:
    """Delete every cached artifact."""
    from difftool.exporters.cache import ArtifactCache

    with click_errors():
        removed = ArtifactCache().clear()
    click.echo(f"removed {removed} artifact(s)")


@hookimpl
def register_exporters(register: Callable[[Exporter], None]) -> None:
    register(OnnxExporter())
    register(TensorRTExporter())
    register(TritonExporter())


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(export_group())
    cli.add_command(cache)
