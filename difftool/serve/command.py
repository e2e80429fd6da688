"""The ``difftool serve`` command. FastAPI and uvicorn are imported only when it runs."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (loopback by default)")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True)
@click.option(
    "--api-token",
    envvar="DIFFTOOL_API_TOKEN",
    help="require 'Authorization: Bearer TOKEN' on every route (or set DIFFTOOL_API_TOKEN: not shown by ps)",
)
@click.option("--insecure", is_flag=True, help="allow a non-loopback --host without --api-token")
@click.option(
    "--allow-path",
    "allow_paths",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="a folder requests may name files in (repeatable; default: none)",
)
@click.option("--cors", "cors_origins", multiple=True, metavar="ORIGIN", help="allow browser calls from ORIGIN")
@click.option("--queue-size", type=click.IntRange(1, 100_000), default=16, show_default=True, help="waiting jobs")
@click.option("--device", "devices", multiple=True, default=("cpu",), show_default=True, help="one worker each")
@click.option("--model", "default_model", help="A1111 sd_model_checkpoint at start (a name from `difftool models`)")
@click.option("--max-body-mb", type=click.IntRange(1, 4096), default=64, show_default=True, help="request size limit")
@click.option(
    "--max-pixels",
    type=click.IntRange(1, 1 << 31),
    default=4096 * 4096,
    show_default=True,
    help="largest image a request may send or ask for (checked before decoding); outputs together: 4x this",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(0, 3600),
    default=30.0,
    show_default=True,
    help="seconds running jobs get on SIGTERM before they are cancelled",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[ADDRESS]",
    help="run on Ray Serve replicas: a local Ray, or the cluster at ADDRESS (auto, ray://HOST:10001)",
)
@click.option(
    "--replicas", type=click.IntRange(1, 10_000), help="with --ray: replicas (default: one per GPU or C CPUs)"
)
@click.option("--cpus-per-replica", type=click.FloatRange(0.01), default=1.0, show_default=True, help="with --ray")
@click.option("--gpus-per-replica", type=click.FloatRange(0), help="with --ray (default: 1 with --device cuda)")
def serve(
    host: str,
    port: int,
    api_token: str | None,
    insecure: bool,
    allow_paths: tuple[Path, ...],
    cors_origins: tuple[str, ...],
    queue_size: int,
    devices: tuple[str, ...],
    default_model: str | None,
    max_body_mb: int,
    max_pixels: int,
    shutdown_timeout: float,
    ray_address: str | None,
    replicas: int | None,
    cpus_per_replica: float,
    gpus_per_replica: float | None,
) -> None:
    """Serve the HTTP API: native /v1 and the AUTOMATIC1111 /sdapi/v1 subset (needs difftool[serve])."""
    from difftool.core.errors import DifftoolError
    from difftool.serve.settings import ServeSettings

    settings = ServeSettings(
        host=host,
        port=port,
        api_token=api_token,
        insecure=insecure,
        allow_paths=allow_paths,
        cors_origins=cors_origins,
        queue_size=queue_size,
        devices=devices,
        default_model=default_model,
        max_body_bytes=max_body_mb * 1024 * 1024,
        max_pixels=max_pixels,
        shutdown_timeout=shutdown_timeout,
    )
    try:
        settings.check()
    except DifftoolError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(2)
    try:
        import uvicorn  # noqa: F401 - checked here, so a missing extra is one line

        from difftool.serve.app import create_app
    except ImportError as error:
        click.echo(f'Error: the server needs FastAPI and uvicorn ({error}); pip install "difftool[serve]"', err=True)
        sys.exit(1)
    if insecure and not api_token:
        click.echo(f"warning: serving on {host} without authentication (--insecure)", err=True)
    if ray_address is not None:
        from difftool.serve.ray_serve import RayOptions, serve_on_ray

        options = RayOptions(
            address=ray_address or None,
            replicas=replicas,
            cpus_per_replica=cpus_per_replica,
            gpus_per_replica=gpus_per_replica,
        )
        try:
            serve_on_ray(settings, options)
        except DifftoolError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(2)
        return
    if replicas is not None or gpus_per_replica is not None:
        click.echo("Error: --replicas and --gpus-per-replica need --ray", err=True)
        sys.exit(2)
    from difftool.serve.app import run

    run(create_app(settings), settings)
