"""``difftool serve --ray``: the same FastAPI application on Ray Serve replicas.

Each replica is a Ray Serve deployment replica (``serve.deployment`` + ``serve.ingress``) that builds the
application with :func:`~difftool.serve.app.create_app` (same routes, token, path policy, limits, CORS),
its own job queue and one worker on its device; Ray Serve's proxy spreads the requests and restarts a
replica that dies. What must be the same on every replica lives in one named actor, the
:class:`~difftool.serve.board.JobBoard`: the ``/v1/jobs`` states, results and cancel flags, and the A1111
options. Ray is imported only when :func:`deploy` runs.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import signal
import threading
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from difftool.core.errors import BackendUnavailableError, ParameterError
from difftool.serve.board import STALE_AFTER, JobBoard, SharedJobQueue
from difftool.serve.settings import ServeSettings

log = logging.getLogger("difftool.serve")

#: The Ray namespace of the job board; the board is named after the Serve application.
NAMESPACE = "difftool"
#: The response header naming the replica (its Ray actor name) that answered.
REPLICA_HEADER = "X-Difftool-Replica"
INSTALL_HINT = 'pip install "difftool[serve,ray]"'


@dataclass(frozen=True)
class RayOptions:
    """Where and how many replicas (``--ray ADDRESS --replicas N --cpus-per-replica C --gpus-per-replica G``)."""

    address: str | None = None  # None: start a local Ray; else "auto", "ray://host:10001", ...
    replicas: int | None = None  # None: one per GPU (--device cuda) or per ``cpus_per_replica`` CPUs
    cpus_per_replica: float = 1.0
    gpus_per_replica: float | None = None  # None: 1 with --device cuda, else 0
    app_name: str = "difftool"
    #: Plugin modules the replicas register (``None``: the installed plugins, as ``difftool serve``).
    plugins: tuple[str, ...] | None = None
    stale_after: float = STALE_AFTER


def import_serve() -> tuple[Any, Any]:
    """``(ray, ray.serve)``, or a one-line error naming the extra to install."""
    try:
        import ray
        from ray import serve
    except ImportError as error:
        raise BackendUnavailableError(
            f"--ray needs Ray Serve, which is not installed ({error})", INSTALL_HINT
        ) from None
    return ray, serve


def board_name(app_name: str) -> str:
    return f"{app_name}-jobs"


class BoardOptions(MutableMapping[str, Any]):
    """The A1111 options (``POST /sdapi/v1/options``), kept on the board so that every replica sees them."""

    def __init__(self, queue: SharedJobQueue, defaults: dict[str, Any]) -> None:
        self.queue = queue
        queue.call("get_options", defaults)

    def _all(self) -> dict[str, Any]:
        return self.queue.call("get_options", {})

    def __getitem__(self, name: str) -> Any:
        return self._all()[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self.queue.call("set_option", name, value)

    def __delitem__(self, name: str) -> None:
        raise TypeError("A1111 options cannot be deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


class DifftoolReplica:
    """One replica: the registry, then (``__serve_build_asgi_app__``) the application wired to the board."""

    def __init__(self, settings: ServeSettings, plugins: tuple[str, ...] | None, app_name: str, threads: int) -> None:
        from difftool.plugins.registry import build_registry, get_registry

        self.settings, self.app_name = settings, app_name
        self.registry = get_registry() if plugins is None else build_registry(list(plugins), entry_points=False)
        if threads:
            import torch

            torch.set_num_threads(threads)

    def __serve_build_asgi_app__(self) -> Any:
        import ray

        from difftool.serve.app import create_app

        app = create_app(self.settings, self.registry)
        server = app.state.server
        name = ray.get_runtime_context().get_actor_name() or ""
        settings = self.settings
        single = server.queue
        server.queue = SharedJobQueue(
            ray.get_actor(board_name(self.app_name), namespace=NAMESPACE),
            name,
            devices=settings.devices,
            queue_size=settings.queue_size,
            keep=settings.keep_jobs,
            abandon_after=settings.abandon_after,
        )
        shutil.rmtree(single.output_dir, ignore_errors=True)
        server.options = BoardOptions(server.queue, dict(server.options))

        @app.middleware("http")
        async def name_the_replica(request: Any, call_next: Any) -> Any:
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = name
            return response

        return app


def replica_resources(settings: ServeSettings, options: RayOptions) -> tuple[ServeSettings, dict[str, float]]:
    """The settings a replica runs with (its one device) and its Ray resources."""
    if len(settings.devices) != 1:
        raise ParameterError(
            "--ray runs one device per replica", "pass one --device (cpu or cuda) and --replicas N instead"
        )
    device = settings.devices[0]
    gpus = options.gpus_per_replica
    if device.startswith("cuda"):
        gpus = 1.0 if gpus is None else gpus
        if gpus <= 0:
            raise ParameterError("--device cuda on Ray needs a GPU per replica", "pass --gpus-per-replica 1")
        device = "cuda"  # Ray makes the replica's GPU its only visible one: cuda:0
    elif device != "cpu":
        raise ParameterError(f"--device {device} is not supported with --ray", "pass --device cpu or --device cuda")
    resources = {"num_cpus": options.cpus_per_replica, "num_gpus": gpus or 0.0}
    return dataclasses.replace(settings, devices=(device,)), resources


def deploy(settings: ServeSettings, options: RayOptions) -> str:
    """Start (or join) Ray, create the job board, run the application on Ray Serve; returns its URL."""
    settings = settings.check()
    ray, serve = import_serve()
    from difftool.executors.ray_data import start_ray

    replica_settings, resources = replica_resources(settings, options)
    start_ray(options.address)
    replicas = options.replicas
    if replicas is None:
        available = ray.cluster_resources()
        if resources["num_gpus"]:
            replicas = int(available.get("GPU", 0) // resources["num_gpus"])
        else:
            replicas = int(available.get("CPU", 1) // max(resources["num_cpus"], 1e-3))
    if replicas < 1:
        raise ParameterError(
            "the Ray cluster has no room for one replica", "lower --cpus-per-replica/--gpus-per-replica"
        )
    ray.remote(JobBoard).options(
        name=board_name(options.app_name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0
    ).remote(settings.keep_jobs, options.stale_after)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    deployment = serve.deployment(
        serve.ingress()(DifftoolReplica),
        name="DifftoolReplica",
        num_replicas=replicas,
        ray_actor_options=resources,
        max_ongoing_requests=settings.queue_size + 16,  # A1111 requests and event streams wait in the handler
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
    )
    threads = 0 if resources["num_gpus"] else max(1, int(resources["num_cpus"]))
    app = deployment.bind(replica_settings, options.plugins, options.app_name, threads)
    serve.run(app, name=options.app_name, route_prefix="/", blocking=False)
    return f"http://{settings.host}:{settings.port}"


def undeploy(options: RayOptions) -> None:
    """Delete the application and its board (Ray itself is left to whoever started it)."""
    ray, serve = import_serve()
    serve.delete(options.app_name)
    try:
        ray.kill(ray.get_actor(board_name(options.app_name), namespace=NAMESPACE))
    except ValueError:  # already gone
        pass


def serve_on_ray(settings: ServeSettings, options: RayOptions) -> None:
    """``difftool serve --ray``: deploy, wait for Ctrl-C or SIGTERM, then remove the application."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    url = deploy(settings, options)
    print(f"difftool serve: {url} on Ray Serve (Ctrl-C stops)", flush=True)
    try:
        stop.wait()
    finally:
        undeploy(options)
        if not options.address:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
