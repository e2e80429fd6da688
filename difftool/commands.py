"""The built-in commands beside ``run``: ``train``, ``check-backends`` and ``serve`` (front ends that drive
training, the API and the server, so they live here, not among the plugins)."""

from __future__ import annotations

from pathlib import Path

import click

from difftool.plugins.click_options import click_errors, context_registry


@click.command()
@click.argument("task", type=click.Choice(["superres", "inpaint"]))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), required=True, help="run folder")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="JSON config (see training/configs)")
@click.option("--steps", type=click.IntRange(1), help="total optimizer steps")
@click.option("--batch", type=click.IntRange(1), help="crops per step")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="peak learning rate")
@click.option("--seed", type=int, help="random seed (default 0)")
@click.option("--threads", type=click.IntRange(0), help="CPU threads (0: PyTorch's default)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="where to train (default: the config's, cpu)")
@click.option("--workers", type=click.IntRange(0), help="processes making batches ahead (0: in the loop)")
@click.option("--data", "folders", multiple=True, type=click.Path(exists=True, file_okay=False), help="image folder")
@click.option("--no-builtin-data", is_flag=True, help="train only on --data folders")
@click.option("--init", type=click.Path(exists=True, file_okay=False), help="fine-tune from this model folder")
@click.option("--no-resume", is_flag=True, help="start over even if OUTPUT has a checkpoint")
def train(
    task: str,
    out: str,
    config: str | None,
    folders: tuple[str, ...],
    no_builtin_data: bool,
    no_resume: bool,
    **overrides: object,
) -> None:
    """Train (or fine-tune) a superres or inpaint model; rerun to resume. Needs difftool[train].

    Writes OUTPUT/model (load it with --model) and OUTPUT/checkpoint. The embedded models were made with
    the configs in difftool/training/configs.
    """
    from difftool.training.data import ImagePool
    from difftool.training.evaluate import evaluate
    from difftool.training.train import TrainConfig, Trainer

    settings = TrainConfig.from_file(Path(config)) if config else TrainConfig.for_task(task)
    if settings.task != task:
        raise click.UsageError(f"--config is for {settings.task!r}, not {task!r}")
    for key, value in overrides.items():
        if value is not None:
            setattr(settings, key, value)
    settings.folders = [*settings.folders, *folders]
    settings.builtin_data = settings.builtin_data and not no_builtin_data
    trainer = Trainer(settings, Path(out))
    if not no_resume and trainer.resume():
        click.echo(f"resuming at step {trainer.step}", err=True)
    pool = ImagePool.from_sources([Path(f) for f in settings.folders], builtin=settings.builtin_data)
    trainer.fit(pool)
    model_dir = trainer.export()
    if settings.builtin_data:
        for row in evaluate(model_dir, task):
            click.echo("  ".join(f"{k}={v}" for k, v in row.items()))
    click.echo(f"model: {model_dir}")


@click.command("check-backends")
@click.argument("task_name", metavar="TASK")
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--mask", type=click.Path(exists=True, dir_okay=False), help="mask, for inpaint")
@click.option("--model", help="model path or name (default: the task's embedded one)")
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "-p", "--param", "params", multiple=True, metavar="NAME=VALUE", help="a task parameter, e.g. -p prompt='a kite'"
)
def check_backends(
    task_name: str, inputs: tuple[str, ...], mask: str | None, model: str | None, device: str, params: tuple[str, ...]
) -> None:
    """Run one request of TASK on every backend available here and compare each with PyTorch fp32 (PSNR).

    \b
    difftool check-backends superres photo.png
    difftool check-backends generate --model sd15.safetensors -p prompt="a kite" -p steps=20
    """
    import numpy as np

    from difftool.app import api
    from difftool.core.errors import DifftoolError
    from difftool.training.evaluate import psnr

    registry = context_registry()
    values: dict[str, str] = {"mask": mask} if mask else {}
    for item in params:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--param")
        values[name.replace("-", "_")] = value
    with click_errors():
        reference = api.run(
            task_name, *inputs, model=model, device=device, dtype="fp32", seed=0, registry=registry, **values
        )
    base = np.asarray(reference.images[0])
    click.echo(f"{'torch fp32':<22} reference")
    for name, entry in sorted(registry.backends.items()):
        reason = entry.value.unavailable_reason(device)
        if reason:
            click.echo(f"{name:<22} unavailable: {reason}")
            continue
        for dtype in ("fp32", "bf16" if device == "cpu" else "fp16"):
            if name == "torch" and dtype == "fp32":
                continue
            try:
                result = api.run(
                    task_name, *inputs, model=model, device=device, backend=name, dtype=dtype, seed=0,
                    registry=registry, **values,
                )  # fmt: skip
            except DifftoolError as error:
                click.echo(f"{name + ' ' + dtype:<22} failed: {error}")
                continue
            score = psnr(base, np.asarray(result.images[0]))
            ran = str(result.record.get("precision", dtype))
            note = "" if ran in (dtype, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]) else ran
            click.echo(
                f"{name + ' ' + dtype:<22} PSNR {score:.2f} dB vs torch fp32" + (f" (ran in {note})" if note else "")
            )


def add_commands(cli: click.Group) -> None:
    """The built-in commands that drive training and the server (front ends of their own, not plugins)."""
    cli.add_command(train)
    cli.add_command(check_backends)
    from difftool.serve.command import serve  # click only: FastAPI loads when the server starts

    cli.add_command(serve)
