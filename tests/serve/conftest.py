"""Fixtures for the server tests: loopback-only sockets, tiny Stable Diffusion models in a model root,
a registry with the example plugin, an in-process client and a live uvicorn server."""

from __future__ import annotations

import importlib.util
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from difftool.plugins.registry import Registry

if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
    collect_ignore_glob = ["test_*.py"]  # the serve extra is not installed: nothing here can run


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like the suite's guard, but the tests may reach their own server on loopback (nothing else)."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        host = address[0] if isinstance(address, tuple) else str(address)
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return real_connect(self, address)
        raise AssertionError(f"a test tried to connect to {address!r}; only loopback is allowed")

    monkeypatch.setattr(socket.socket, "connect", guarded)


def _tiny() -> Any:
    """tests/plugins/builtin/sd/tiny.py (the tiny random Stable Diffusion builders), loaded by path."""
    path = Path(__file__).resolve().parents[1] / "plugins" / "builtin" / "sd" / "tiny.py"
    spec = importlib.util.spec_from_file_location("_serve_tests_sd_tiny", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A DIFFTOOL_MODELS folder with a tiny SD checkpoint (``tiny-sd``), a tiny SD inpainting one,
    ``tiny-sd8`` with its ControlNet ``cn-tiny``, and ``tiny-sdxl`` with its refiner ``tiny-refiner``."""
    tiny = _tiny()
    root = tmp_path_factory.mktemp("serve-models")
    tiny.save_folder(tiny.components(seed=2), root / "tiny-sd")
    tiny.save_folder(tiny.components(in_channels=9, seed=4), root / "tiny-sd-inpaint")
    tiny.save_folder(tiny.components(xl=True, seed=8), root / "tiny-sdxl")
    tiny.save_folder(tiny.refiner_components(seed=9), root / "tiny-refiner")
    # With SD's 8x latent scale (a ControlNet's conditioning encoder assumes it) and a ControlNet for it.
    parts = tiny.components(vae_levels=4, seed=6)
    tiny.save_folder(parts, root / "tiny-sd8")
    (root / "ControlNet").mkdir()
    tiny.save_controlnet_file(tiny.controlnet(parts["unet"], seed=7), root / "ControlNet" / "cn-tiny.safetensors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFTOOL_MODELS", str(root))
        yield root


@pytest.fixture(scope="session")
def serve_registry() -> Registry:
    """Built-ins plus the example plugin (its ``posterize`` task and ``ddim-trailing`` scheduler)."""
    from difftool.plugins.registry import build_registry

    return build_registry(["difftool_plugin_example"], entry_points=False)


@pytest.fixture
def make_client(serve_registry: Registry) -> Iterator[Any]:
    """``make_client(**settings)``: a TestClient on a fresh app (workers started, stopped after the test)."""
    from fastapi.testclient import TestClient

    from difftool.serve.app import create_app
    from difftool.serve.settings import ServeSettings

    clients = []

    def make(registry: Registry | None = None, start_workers: bool = True, **settings: Any) -> Any:
        app = create_app(ServeSettings(**settings), registry or serve_registry, start_workers=start_workers)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def live_server(model_root: Path, serve_registry: Registry) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 (a free port), in a thread; yields ``host:port``.

    torch computes on one thread meanwhile: with the clients' threads in the same process (and whatever else
    runs on a small CI machine), two intra-op threads on two cores stall each other at every step.
    """
    import torch
    import uvicorn

    from difftool.serve.app import create_app
    from difftool.serve.settings import ServeSettings

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app = create_app(ServeSettings(default_model="tiny-sd"), serve_registry)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)
    sock.close()
    torch.set_num_threads(threads)
