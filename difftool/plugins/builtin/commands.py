"""Built-in extra commands, added through ``register_commands`` like any plugin's: ``difftool train``."""

from __future__ import annotations

from pathlib import Path

import click

from difftool.plugins.hookspecs import hookimpl


@click.command()
@click.argument("task", type=click.Choice(["superres", "inpaint"]))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), required=True, help="run folder")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="JSON config (see training/configs)")
@click.option("--steps", type=click.IntRange(1), help="total optimizer steps")
@click.option("--batch", type=click.IntRange(1), help="crops per step")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="peak learning rate")
@click.option("--seed", type=int, help="random seed (default 0)")
@click.option("--threads", type=click.IntRange(0), help="CPU threads (0: PyTorch's default)")
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


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(train)
