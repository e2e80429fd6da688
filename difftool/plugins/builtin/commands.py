"""Built-in extra commands, added through ``register_commands`` like any plugin's: ``difftool train``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def click_errors() -> Iterator[None]:
    """Turn difftool's one-line errors into click's (message, exit 1)."""
    from difftool.core.errors import DifftoolError

    try:
        yield
    except DifftoolError as error:
        raise click.ClickException(str(error)) from None


def load_task_model(task_name: str, model: str | None) -> Any:
    """The model ``--model`` names for ``task_name`` (the embedded one by default), loaded.

    A Stable Diffusion checkpoint or folder works too: its U-Net exports like a pixel model's.
    """
    from types import SimpleNamespace

    from difftool.plugins.builtin import pixel_model
    from difftool.plugins.builtin.sd.loader import is_sd_model, load_sd_model

    if model and is_sd_model(Path(model).expanduser()):
        sd = load_sd_model(model)  # fp32 U-Net: exports are keyed by the checkpoint, not rounded weights
        return SimpleNamespace(unet=sd.unet, sha256=sd.unet_id, scheduler_config=sd.scheduler_config)
    return pixel_model.load_pixel_model(pixel_model.resolve_model(task_name, model), task_name)


@click.group()
def export() -> None:
    """Export a task's denoiser for another runtime (validated against PyTorch, cached)."""


@export.command("onnx")
@click.option("--task", "task_name", type=click.Choice(["superres", "inpaint"]), default="superres", show_default=True)
@click.option("--model", help="pixel model folder, or a Stable Diffusion checkpoint/folder (default: the embedded one)")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="fp16 keeps fp32 inputs/output, normalisations, softmax and the timestep embedding",
)
def export_onnx(task_name: str, model: str | None, precision: str) -> None:
    """Export the U-Net to ONNX; prints the cached file and the measured error."""
    from difftool.exporters.onnx import cached_export

    with click_errors():
        loaded = load_task_model(task_name, model)
        entry = cached_export(
            loaded.unet, name=f"unet-{loaded.sha256[:12]}", precision=precision, model_id=loaded.sha256
        )
    report = entry.manifest["validation"]
    click.echo(f"{entry.file('model.onnx')}")
    for shape in report["shapes"]:
        click.echo(f"  shape {shape['shape']}: max relative error {shape['relative_error']:.2e}")
    click.echo(f"  tolerance {report['tolerance']:.0e}; manifest {entry.file('manifest.json')}")


@export.command("tensorrt")
@click.option("--task", "task_name", type=click.Choice(["superres", "inpaint"]), default="superres", show_default=True)
@click.option("--model", help="pixel model folder, or a Stable Diffusion checkpoint/folder (default: the embedded one)")
@click.option("--device", default="cuda", show_default=True, help="the GPU the engine is for")
@click.option(
    "--precision",
    type=click.Choice(["fp16", "bf16", "fp32", "fp8"]),
    default="fp16",
    show_default=True,
    help="engine precision (bf16 needs compute capability 8.0+; fp8 is refused: it needs a quantized export)",
)
def export_tensorrt(task_name: str, model: str | None, device: str, precision: str) -> None:
    """Build (or reuse) the TensorRT engine for TASK's U-Net from its validated ONNX export."""
    from difftool.exporters.tensorrt_engine import precision_flags, unavailable_reason
    from difftool.plugins.builtin.backends import TensorRTBackend

    if precision == "fp8":
        with click_errors():
            precision_flags(precision, (9, 0))  # raises: says why and what to use instead
    reason = unavailable_reason(device)
    if reason:
        raise click.ClickException(f"cannot build a TensorRT engine here: {reason}")
    with click_errors():
        backend = TensorRTBackend().resolve(device, precision)
        loaded = load_task_model(task_name, model)
        denoiser = backend.make_denoiser(
            loaded.unet,
            prediction_type=loaded.scheduler_config.get("prediction_type", "epsilon"),
            model_id=loaded.sha256,
        )
    click.echo(f"engine {denoiser.fingerprint} (profiles: {[p.as_json() for p in denoiser.profiles]})")


@export.command("triton")
@click.argument("task_name", metavar="TASK", type=click.Choice(["superres", "inpaint"]))
@click.option("-o", "--output", "repo", type=click.Path(file_okay=False), required=True, help="model repository")
@click.option("--model", help="pixel model folder, or a Stable Diffusion checkpoint/folder (default: the embedded one)")
@click.option("--name", help="model name in the repository (default: difftool_TASK)")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True, help="Triton batch limit")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True, help="model instances")
@click.option("--gpu", is_flag=True, help="instances on GPUs (KIND_GPU) instead of CPUs")
def export_triton(
    task_name: str, repo: str, model: str | None, name: str | None, max_batch: int, instances: int, gpu: bool
) -> None:
    """Write a Triton Inference Server model repository for TASK's U-Net (ONNX; TensorRT plan if built)."""
    from difftool.exporters.onnx import UNetSignature, cached_export
    from difftool.exporters.triton import TritonOptions, write_repository

    with click_errors():
        loaded = load_task_model(task_name, model)
        entry = cached_export(loaded.unet, name=f"unet-{loaded.sha256[:12]}", model_id=loaded.sha256)
        options = TritonOptions(max_batch, instances, "KIND_GPU" if gpu else "KIND_CPU")
        folder = write_repository(
            repo,
            name or f"difftool_{task_name}",
            entry.file("model.onnx"),
            UNetSignature.of(loaded.unet),
            options,
            weights_id=loaded.sha256,
        )
    click.echo(f"{folder} (serve with: tritonserver --model-repository {Path(repo).resolve()})")


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

    from difftool import api
    from difftool.core.errors import DifftoolError
    from difftool.plugins.registry import get_registry
    from difftool.training.evaluate import psnr

    registry = get_registry()
    values: dict[str, str] = {"mask": mask} if mask else {}
    for item in params:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--param")
        values[name.replace("-", "_")] = value
    with click_errors():
        reference = api.run(task_name, *inputs, model=model, device=device, dtype="fp32", seed=0, **values)
    base = np.asarray(reference.images[0])
    click.echo(f"{'torch fp32':<22} reference")
    for name, (backend, _) in sorted(registry.backends.items()):
        reason = backend.unavailable_reason(device)
        if reason:
            click.echo(f"{name:<22} unavailable: {reason}")
            continue
        for dtype in ("fp32", "bf16" if device == "cpu" else "fp16"):
            if name == "torch" and dtype == "fp32":
                continue
            try:
                result = api.run(
                    task_name, *inputs, model=model, device=device, backend=name, dtype=dtype, seed=0, **values
                )
            except DifftoolError as error:
                click.echo(f"{name + ' ' + dtype:<22} failed: {error}")
                continue
            score = psnr(base, np.asarray(result.images[0]))
            ran = str(result.record.get("precision", dtype))
            note = "" if ran in (dtype, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]) else ran
            click.echo(
                f"{name + ' ' + dtype:<22} PSNR {score:.2f} dB vs torch fp32" + (f" (ran in {note})" if note else "")
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
def register_commands(cli: click.Group) -> None:
    cli.add_command(train)
    cli.add_command(export)
    cli.add_command(cache)
    cli.add_command(check_backends)
