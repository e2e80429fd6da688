"""``difftool serve --ray``: the same FastAPI application on Ray Serve, in two deployments.

- ``DifftoolReplica`` (the HTTP replicas, light: no model): ``serve.deployment`` + ``serve.ingress`` of the
  application :func:`~difftool.serve.app.create_app` builds (same routes, token, path policy, limits, CORS)
  with its bounded job queue; its worker threads run each job on
- ``DifftoolWorker`` (the model replicas, ``--replicas N``: one per GPU or per ``--cpus-per-replica`` CPUs),
  through a Ray Serve handle (:mod:`difftool.serve.ray_worker`): Ray Serve picks the replica, and a run whose
  replica died is sent again.

Ray Serve's proxy spreads the HTTP requests and restarts replicas that die. What must be the same on every
HTTP replica lives in one named actor, the :class:`~difftool.serve.board.JobBoard`: the ``/v1/jobs`` states,
results and cancel flags, and the A1111 options. Ray is imported only when :func:`deploy` runs.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from difftool.core.errors import BackendUnavailableError, DifftoolError, ParameterError
from difftool.serve.board import STALE_AFTER, JobBoard, SharedJobQueue
from difftool.serve.settings import ServeSettings

#: The Ray namespace of the job board; the board is named after the Serve application.
NAMESPACE = "difftool"
#: The response header naming the replica (its Ray actor name) that answered.
REPLICA_HEADER = "X-Difftool-Replica"
INSTALL_HINT = 'pip install "difftool[serve,ray]"'


@dataclass(frozen=True)
class RayOptions:
    """Where and how many replicas (``--ray ADDRESS --replicas N --cpus-per-replica C --gpus-per-replica G``)."""

    address: str | None = None  # None: start a local Ray; else "auto", "ray://host:10001", ...
    replicas: int | None = None  # model replicas; None: one per GPU (--device cuda) or per ``cpus_per_replica`` CPUs
    http_replicas: int | None = None  # None: 2 (1 with one model replica)
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
    """One HTTP replica: the registry, then (``__serve_build_asgi_app__``) the application wired to the board
    and to the model replicas (``worker``: the ``DifftoolWorker`` handle; ``device``: theirs)."""

    def __init__(
        self, settings: ServeSettings, plugins: tuple[str, ...] | None, app_name: str, worker: Any, device: str
    ) -> None:
        import torch

        from difftool.plugins.registry import build_registry, get_registry

        self.settings, self.app_name, self.worker, self.device = settings, app_name, worker, device
        self.registry = get_registry() if plugins is None else build_registry(list(plugins), entry_points=False)
        torch.set_num_threads(1)  # requests are checked and decoded here; models run on the model replicas

    def __serve_build_asgi_app__(self) -> Any:
        import ray

        from difftool.serve.app import create_app
        from difftool.serve.ray_worker import RemoteJobQueue

        app = create_app(self.settings, self.registry)
        server = app.state.server
        name = ray.get_runtime_context().get_actor_name() or ""
        settings = self.settings
        single = server.queue
        server.queue = RemoteJobQueue(
            ray.get_actor(board_name(self.app_name), namespace=NAMESPACE),
            name,
            self.worker,
            self.device,
            devices=settings.devices,
            queue_size=settings.queue_size,
            keep=settings.keep_jobs,
            abandon_after=settings.abandon_after,
        )
        single.remove_results()
        queue, make_job = server.queue, server.make_job

        def make_job_for_workers(*args: Any, dtype: str | None = None, **kwargs: Any) -> Any:
            job = make_job(*args, dtype=dtype, **kwargs)
            queue.dtypes[job.id] = dtype or "auto"
            return job

        server.make_job = make_job_for_workers  # type: ignore[method-assign]
        server.options = BoardOptions(server.queue, dict(server.options))

        app.add_middleware(ReplicaHeader, name=name)
        return app


class ReplicaHeader:
    """Every answer names the HTTP replica that gave it (plain ASGI: streams and disconnects pass untouched)."""

    def __init__(self, app: Any, name: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.lower().encode("latin-1"), name.encode("latin-1"))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def named(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named if scope["type"] == "http" else send)


#: CPUs reserved for each HTTP replica (it checks and decodes requests; the models run elsewhere).
HTTP_REPLICA_CPUS = 0.25


def replica_resources(settings: ServeSettings, options: RayOptions) -> tuple[str, dict[str, float]]:
    """The model replicas' device and Ray resources."""
    if len(settings.devices) != 1:
        raise ParameterError(
            "--ray runs one device per model replica", "pass one --device (cpu or cuda) and --replicas N instead"
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
    return device, {"num_cpus": options.cpus_per_replica, "num_gpus": gpus or 0.0}


def deploy(settings: ServeSettings, options: RayOptions) -> str:
    """Start (or join) Ray, create the job board, run the application on Ray Serve; returns its URL."""
    settings = settings.check()
    ray, serve = import_serve()
    from difftool.app.executors.ray_data import start_ray
    from difftool.serve.ray_worker import DifftoolWorker

    device, resources = replica_resources(settings, options)
    start_ray(options.address)
    replicas = options.replicas
    if replicas is None:
        available = ray.cluster_resources()
        if resources["num_gpus"]:
            replicas = int(available.get("GPU", 0) // resources["num_gpus"])
        else:
            replicas = int((available.get("CPU", 1) - HTTP_REPLICA_CPUS) // max(resources["num_cpus"], 1e-3))
    if replicas < 1:
        raise ParameterError(
            "the Ray cluster has no room for one replica", "lower --cpus-per-replica/--gpus-per-replica"
        )
    try:  # a board left by a run that crashed would carry its options and jobs into this one
        ray.kill(ray.get_actor(board_name(options.app_name), namespace=NAMESPACE))
    except ValueError:
        pass
    ray.remote(JobBoard).options(
        name=board_name(options.app_name), namespace=NAMESPACE, lifetime="detached", num_cpus=0
    ).remote(settings.keep_jobs, options.stale_after)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    _check_proxy(serve, settings)
    workers = serve.deployment(
        DifftoolWorker,
        name="DifftoolWorker",
        num_replicas=replicas,
        ray_actor_options=resources,
        max_ongoing_requests=1,  # one run at a time per model replica; Ray Serve holds the others
    )
    threads = 0 if resources["num_gpus"] else max(1, int(resources["num_cpus"]))
    worker = workers.bind(options.plugins, device, threads, board_name(options.app_name), NAMESPACE)
    front = serve.deployment(
        serve.ingress()(DifftoolReplica),
        name="DifftoolReplica",
        num_replicas=options.http_replicas or min(2, replicas),
        ray_actor_options={"num_cpus": HTTP_REPLICA_CPUS},
        # The app bounds its own queue (429); event streams and waiting A1111 requests hold a slot each, so the
        # replica takes many, and what Ray Serve cannot take is refused at once instead of waiting unbounded.
        max_ongoing_requests=max(256, settings.queue_size * 8),
        max_queued_requests=settings.queue_size,
        # Longer than the app's own drain, which then cancels its runs itself before Ray stops the replica.
        graceful_shutdown_timeout_s=settings.shutdown_timeout + 10,
    )
    # One queue thread per model replica, so that one HTTP replica can keep them all busy.
    http_settings = dataclasses.replace(settings, devices=("cpu",) * replicas)
    app = front.bind(http_settings, options.plugins, options.app_name, worker, device)
    serve.run(app, name=options.app_name, route_prefix="/", blocking=False)
    return f"http://{settings.host}:{settings.port}"


def _check_proxy(serve: Any, settings: ServeSettings) -> None:
    """Refuse when Ray Serve was already running on another address: it keeps its own and ignores ours."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
    except Exception:  # noqa: BLE001 - a Ray that does not expose it: nothing to compare
        return
    if (http.host, int(http.port)) != (settings.host, int(settings.port)):
        raise ParameterError(
            f"Ray Serve already listens on {http.host}:{http.port}, not {settings.host}:{settings.port}",
            "pass that --host/--port, or stop the running Ray Serve (serve shutdown) first",
        )


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
    ray, serve = import_serve()
    stop = threading.Event()
    try:
        try:
            url = deploy(settings, options)
        except DifftoolError:
            raise
        except Exception as error:  # noqa: BLE001 - Ray's own errors (no cluster, a replica that cannot start)
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise DifftoolError(
                f"Ray Serve could not start the application: {type(error).__name__}: {first}",
                "check --ray ADDRESS, the port, and that every --allow-path exists on the cluster's nodes",
            ) from error
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
            signal.signal(sig, lambda *_: stop.set())
        print(f"difftool serve: {url} on Ray Serve (Ctrl-C stops)", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        if ray.is_initialized():
            undeploy(options)
            if not options.address:  # the local Ray this command started
                serve.shutdown()
                ray.shutdown()
