"""The ``difftool`` command line. Commands only parse, call :mod:`difftool.app.api` and print."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import click

from difftool import __version__
from difftool.core.devices import DTYPES
from difftool.core.errors import DifftoolError, exit_code
from difftool.core.task import Param, RegistryView, Task
from difftool.plugins.click_options import context_registry, param_option

if TYPE_CHECKING:
    from difftool.plugins.registry import Registry


def fail(error: DifftoolError, debug: bool) -> None:
    """Print the one-line error (and the traceback with --debug) and exit 2 (usage) or 1."""
    if debug:
        import traceback

        traceback.print_exception(error)
    from difftool.app.batch import shown

    click.echo(shown(f"Error: {error}"), err=True)
    sys.exit(exit_code(error))


# --- task parameters -> click options ---------------------------------------------------------------


def click_option(param: Param, registry: RegistryView) -> click.Option:
    """The click option for one declared task parameter (choices from the registry where declared so)."""
    from difftool.app.plan import param_choices

    return param_option(param, param_choices(param, registry) if param.type == "choice" else None)


def backend_options(registry: RegistryView) -> list[click.Option]:
    """``--backend``, ``--device``, ``--dtype`` and ``--backend-opt``: only for tasks that load a model."""
    declared = "; ".join(
        f"{name}: {', '.join(p.name for p in entry.value.options)}"
        for name, entry in sorted(registry.backends.items())
        if entry.value.options
    )
    return [
        click.Option(["--backend"], type=click.Choice(sorted(registry.backends)), default="torch", show_default=True),
        click.Option(["--device"], default="cpu", show_default=True, help="cpu or cuda[:N]"),
        click.Option(
            ["--dtype"],
            type=click.Choice(DTYPES),
            default="auto",
            show_default=True,
            help="auto: bf16 on CPUs with AMX/AVX-512 BF16, fp16 on CUDA, else fp32",
        ),
        click.Option(
            ["--backend-opt", "backend_opt"],
            multiple=True,
            metavar="NAME=VALUE",
            help=f"a backend option ({declared}; `difftool backends` lists them with defaults)",
        ),
    ]


def parse_backend_options(items: tuple[str, ...]) -> dict[str, str]:
    """``("threads=4", "provider=cpu")`` -> ``{"threads": "4", "provider": "cpu"}``; values are checked later."""
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--backend-opt")
        options[name.strip().replace("-", "_")] = value
    return options


def common_options(task: Task, registry: RegistryView) -> list[click.Option]:
    options = [
        click.Option(["-o", "--output"], help="output file (one input) or folder; default: beside each input"),
        click.Option(["--overwrite"], is_flag=True, help="replace existing outputs"),
        click.Option(["--seed"], type=click.IntRange(0, 2**63 - 1), help="random seed (default: random, recorded)"),
        click.Option(["--json", "as_json"], is_flag=True, help="print a machine-readable result on stdout"),
        click.Option(
            ["--executor"],
            type=click.Choice(["local", "ray"]),
            default="local",
            show_default=True,
            help="ray: run the batch on Ray Data (pip install difftool[ray])",
        ),
        click.Option(["--address"], help="Ray cluster: auto or ray://HOST:PORT (default: start Ray on this machine)"),
        click.Option(["--workers"], type=click.IntRange(1, 4096), help="Ray actors (default: one per CPU)"),
        click.Option(["--gpus-per-worker"], type=click.FloatRange(0, 64), help="GPUs for each Ray actor"),
        click.Option(["--debug"], is_flag=True, help="show tracebacks and debug logs"),
    ]
    if task.uses_model:
        options[2:2] = backend_options(registry)
        options.insert(0, click.Option(["--model"], help="model folder, file or name from `difftool models`"))
    return options


def task_command(name: str, registry: RegistryView) -> click.Command:
    task = registry.tasks[name].value  # the declaration (class attributes): the preflight makes the instance
    params: list[click.Parameter] = [click.Argument(["inputs"], nargs=-1, required=bool(task.inputs))]
    params += [click_option(p, registry) for p in task.params]
    params += common_options(task, registry)
    if not task.inputs:
        params.append(
            click.Option(
                ["--batch-count"], type=click.IntRange(1, 10000), default=1, show_default=True, help="images to make"
            )
        )

    def callback(**values: Any) -> None:
        run_batch(name, registry, values)

    inputs = ", ".join(f"{p.name} ({p.kind})" for p in task.inputs)
    usage = (
        f"INPUTS: {inputs}; files, folders or glob patterns."
        if task.inputs
        else "Takes no input files; --batch-count N makes N images with seeds SEED, SEED+1, ..."
    )
    return click.Command(
        name,
        params=params,
        callback=callback,
        help=f"{task.summary}.\n\n{usage}",
        short_help=task.summary,
    )


def run_batch(task_name: str, registry: RegistryView, values: dict[str, Any]) -> None:
    from difftool.app.runs import run_files

    debug = values.pop("debug")
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(message)s")
    specs = list(values.pop("inputs"))
    count = values.pop("batch_count", 1)
    output, overwrite, as_json = values.pop("output"), values.pop("overwrite"), values.pop("as_json")
    executor = values.pop("executor", "local")
    ray_options = {k: values.pop(k, None) for k in ("address", "workers", "gpus_per_worker")}
    request = {k: values.pop(k) for k in ("model", "backend", "device", "dtype") if k in values}
    seed = values.pop("seed", None)
    if "backend_opt" in values:
        request["backend_options"] = parse_backend_options(values.pop("backend_opt"))
    params = {k: v for k, v in values.items() if v is not None}
    try:
        result = run_files(
            task_name,
            specs,
            output=output,
            seed=seed,
            overwrite=overwrite,
            count=count,
            request=request,
            params=params,
            executor=executor,
            ray_options=ray_options,
            registry=registry,
        )
    except DifftoolError as error:
        fail(error, debug)
    records = result["results"]
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        from difftool.app.batch import shown

        for r in records:
            source = f"{r['input']} -> " if r["input"] else ""
            made = shown(source + ", ".join(r["outputs"]))
            if r["status"] == "ok":
                click.echo(f"{made} (seed {r['seed']}, {r['seconds']:.1f} s)")
            elif r.get("reason"):
                click.echo(f"{made} (skipped: {r['reason']})")
            elif r["status"] == "skipped":
                click.echo(f"{made} (up to date, skipped; --overwrite redoes it)")
        if len(records) > 1:
            click.echo(f"{result['ok']} done, {result['skipped']} skipped, {result['failed']} failed", err=True)
    if result["failed"]:
        sys.exit(1)


# --- command groups ---------------------------------------------------------------------------------


class RunGroup(click.Group):
    """``difftool run TASK``: one subcommand per registered task, generated from its declaration (once per
    invocation, from the registry in the root context's ``obj``: see :func:`context_registry`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(context_registry(ctx).tasks)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        registry = context_registry(ctx)
        if cmd_name not in registry.tasks:
            return None
        built = ctx.meta.setdefault("difftool.run.commands", {})  # meta is shared by the whole invocation
        if cmd_name not in built:
            built[cmd_name] = task_command(cmd_name, registry)
        return built[cmd_name]

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            known = ", ".join(self.list_commands(ctx)) or "none"
            raise click.UsageError(f"unknown task {name!r} (available: {known}); see `difftool tasks`", ctx)
        return super().resolve_command(ctx, args)


class MainGroup(click.Group):
    """The top-level group; plugins add commands through ``register_commands``."""

    def _add_plugin_commands(self, ctx: click.Context) -> None:
        from difftool.core.runtime import current
        from difftool.plugins.registry import call_each

        added = current().cache("cli-plugin-commands", set)  # groups the plugins' commands were added to
        if id(self) in added:
            return
        added.add(id(self))
        call_each(context_registry(ctx), "register_commands", lambda plugin: {"cli": self})

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands(ctx)
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self._add_plugin_commands(ctx)
            command = super().get_command(ctx, cmd_name)
        return command


@click.group(cls=MainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="difftool")
@click.option("--no-plugins", is_flag=True, help="ignore third-party plugins (same as DIFFTOOL_NO_PLUGINS=1)")
def cli(no_plugins: bool) -> None:
    """Diffusion models on images: super-resolution, inpainting, generation, style. Offline."""
    if no_plugins:
        os.environ["DIFFTOOL_NO_PLUGINS"] = "1"


@cli.group(cls=RunGroup)
def run() -> None:
    """Run a task: difftool run TASK INPUTS... [OPTIONS] (see `difftool tasks`)."""


def _table(rows: list[tuple[str, ...]]) -> None:
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join([c.ljust(w) for c, w in zip(row, widths, strict=False)] + [row[-1]]).rstrip())


@cli.command()
@click.argument("name", required=False)
def tasks(name: str | None) -> None:
    """List tasks, or show the parameters of task NAME."""
    registry = context_registry()
    if name is None:
        rows = []
        for task_name, entry in sorted(registry.tasks.items()):
            reason = entry.value().availability(None)
            rows.append((task_name, "ready" if reason is None else "needs --model", entry.value.summary))
        _table(rows)
        return
    try:
        task = registry.task(name)
    except DifftoolError as error:
        fail(error, False)
    reason = task.availability(None)
    click.echo(f"{task.name}: {task.summary} (plugin {registry.task_plugin(name)})")
    if reason:
        click.echo(f"  not ready: {reason}")
    click.echo("inputs: " + ", ".join(f"{p.name} ({p.kind})" for p in task.inputs))
    click.echo("parameters:")
    from difftool.app.plan import param_choices

    rows = []
    for p in task.params:
        kind = p.type
        if p.type == "choice":
            kind = "|".join(map(str, param_choices(p, registry)))
        elif p.min is not None or p.max is not None:
            kind += f" {p.range_text()}"
        default = "required" if p.required else f"default {p.default}"
        rows.append((f"  {p.flag}", kind, default, p.help))
    _table(rows)


@cli.command()
def backends() -> None:
    """List backends, whether each runs here (CPU and cuda), and their --backend-opt options."""
    from difftool.core.cuda import runtime

    registry = context_registry()
    devices = ["cpu"] + ([f"cuda:{i}" for i in range(runtime().device_count())] or ["cuda"])
    for name, entry in sorted(registry.backends.items()):
        backend = entry.value
        click.echo(f"{name} ({entry.plugin}): {backend.summary}")
        for device in devices:
            reason = backend.unavailable_reason(device)
            click.echo(f"  {device}: {'ready' if reason is None else 'unavailable: ' + reason}")
        rows = []
        for p in backend.options:
            kind = "|".join(map(str, p.choices)) if p.type == "choice" else f"{p.type} {p.range_text()}".rstrip()
            default = f"default {p.default}" + (f" (${p.env})" if p.env else "")
            rows.append((f"  --backend-opt {p.name}=", kind, default, p.help))
        _table(rows)


@cli.command()
def schedulers() -> None:
    """List schedulers (usable as --scheduler)."""
    registry = context_registry()
    _table([(e.name, e.label, e.plugin, e.summary) for e in registry.schedulers.values()])


@cli.command()
def plugins() -> None:
    """List plugins, what each registered, and plugins that failed."""
    registry = context_registry()
    for info in registry.plugins.values():
        kind = "built-in" if info.builtin else f"plugin {info.version}".rstrip()
        click.echo(f"{info.name} ({kind}): {', '.join(info.registered) or 'nothing registered'}")
    for failure in registry.failures:
        click.echo(f"FAILED {failure}")


@cli.command()
def models() -> None:
    """List models found on disk (see docs: ~/.difftool/models, $DIFFTOOL_MODELS)."""
    registry = context_registry()
    found = registry.find_models()
    if not found:
        click.echo("no models found; put them in ~/.difftool/models or point DIFFTOOL_MODELS at a folder", err=True)
    _table([(m.name, m.family, str(m.path)) for m in found])


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable")
def info(as_json: bool) -> None:
    """What this install can do: versions, devices, backends, models, cache, plugins (paste it into bug reports)."""
    from difftool.info import as_text, collect

    report = collect(context_registry())
    click.echo(json.dumps(report, indent=2, default=str) if as_json else as_text(report))


@cli.command()
@click.argument("image", required=False, type=click.Path(exists=True, dir_okay=False))
def gui(image: str | None) -> None:
    """Open the desktop app (needs difftool[gui] and a display)."""
    from difftool.gui import main as gui_main

    sys.exit(gui_main([image] if image else []))


from difftool.commands import add_commands  # noqa: E402 - after the group they join

add_commands(cli)


def main(argv: list[str] | None = None, registry: Registry | None = None) -> None:
    """Console-script entry point (``registry``: run with this one instead of the installed plugins')."""
    cli.main(args=argv, prog_name="difftool", obj=registry)
