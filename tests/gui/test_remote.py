"""Issue 18, part 7: the desktop app drives a `difftool serve` server (forms from /v1/tasks, progress from
its event stream, results and errors back in the window)."""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gui_helpers import wait_for

pytest.importorskip("fastapi", reason="the test extra installs the serve extra")
pytest.importorskip("uvicorn", reason="the test extra installs the serve extra")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's guard, except that the window may reach its server on loopback."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else ""
        if self.family == socket.AF_UNIX or host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return real_connect(self, address)
        raise AssertionError(f"a test tried to connect to {address!r}; only loopback is allowed")

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    from gui_helpers import DialPlugin

    from difftool.plugins.registry import build_registry
    from difftool.serve.app import create_app
    from difftool.serve.settings import ServeSettings
    from difftool.testing.serve import live_server

    registry = build_registry([DialPlugin()], entry_points=False)  # dial: a slow task, steps of 50 ms
    with live_server(create_app(ServeSettings(), registry)) as address:
        yield f"http://{address}"


def test_the_window_runs_its_jobs_on_a_server_and_back_here(window, qapp, server: str, photo: Path) -> None:
    from difftool.app import api
    from difftool.core.errors import ParameterError
    from difftool.core.task import RegistryView
    from difftool.gui.remote import RemoteRegistry

    assert window.connect_to(server)
    assert isinstance(window.registry, RemoteRegistry) and server in window.windowTitle()
    assert isinstance(window.registry, RegistryView)  # what the window reads of any registry
    assert window.registry.backend("torch").unavailable_reason("cpu") is None  # Entry(value, plugin) as here
    with pytest.raises(ParameterError, match="has no task 'nope'"):
        window.registry.task("nope")
    assert "superres" in [window.task_box.itemText(i) for i in range(window.task_box.count())]
    window.send_menu.aboutToShow.emit()  # Edit > Send result to: the server's tasks that take an image
    assert [a.text() for a in window.send_menu.actions()] == sorted(
        name for name, entry in window.registry.tasks.items() if entry.value.inputs
    )
    window.task_box.setCurrentText("style")
    from difftool.gui.form import PathField

    assert isinstance(window.form.widgets["reference"], PathField)  # the server's own paths, typed: none dropped
    window.task_box.setCurrentText("superres")
    assert set(window.form.widgets) >= {"scale", "tile", "overlap"}  # the form comes from the server's schema
    window.form.widgets["scale"].setCurrentText("2")
    window.open_path(photo)
    window.seed_box.setValue(5)
    steps: list[int] = []
    window.queue.signals.progress.connect(lambda job_id, step, total, preview: steps.append(step))
    job_id = window.run_current()
    wait_for(window.queue, qapp)
    job = window.queue.jobs[job_id]
    assert job.state == "done", job.error
    local = api.run("superres", photo, scale=2, seed=5)
    assert np.array_equal(np.asarray(job.result.image.convert("RGB")), np.asarray(local.images[0].convert("RGB")))
    assert job.result.record["seed"] == 5 and steps  # the server's record; progress from its event stream
    window.task_box.setCurrentText("inpaint")
    window.run_current()  # no mask: the server refuses, the window says so in its own words
    wait_for(window.queue, qapp)
    assert "mask" in window.last_error
    window.use_registry(None)
    assert not isinstance(window.registry, RemoteRegistry) and window.windowTitle() == "difftool"


def test_an_unreachable_server_is_one_clear_error(window, qapp) -> None:
    assert not window.connect_to("http://127.0.0.1:9")  # nothing listens on the discard port
    assert "cannot reach the server" in window.last_error


def test_cancelling_a_remote_job_stops_it_on_the_server(window, qapp, server: str, photo: Path) -> None:
    import json
    import urllib.request

    assert window.connect_to(server)
    window.task_box.setCurrentText("dial")
    window.form.widgets["count"].setValue(9)
    window.open_path(photo)
    window.queue.signals.progress.connect(lambda job_id, step, total, preview: window.cancel_running())
    job_id = window.run_current()
    wait_for(window.queue, qapp)
    assert window.queue.jobs[job_id].state == "cancelled"
    remote = window.registry.last_job
    deadline = time.monotonic() + 10
    while True:  # the server's job was cancelled too, not left running
        with urllib.request.urlopen(f"{server}/v1/jobs/{remote}", timeout=5) as response:  # noqa: S310 - loopback
            state = json.loads(response.read())["state"]
        if state == "cancelled" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert state == "cancelled"
    window.use_registry(None)
