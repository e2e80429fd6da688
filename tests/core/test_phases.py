"""Phases between steps (loading a model, building an export) reach whoever runs the task, and only them."""

import threading
from pathlib import Path

from difftool.app import api
from difftool.core import phases
from difftool.core.runtime import Runtime, using


def test_a_run_announces_loading_its_model_then_building_its_export(
    superres_model: Path, photo: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    heard: list[tuple[str, int | None, int | None]] = []
    steps: list[int] = []
    with using(Runtime()):  # nothing loaded yet
        api.run(
            "superres",
            photo,
            model=str(superres_model),
            scale=2,
            seed=1,
            backend="onnx",
            phase=lambda what, done, total: heard.append((what, done, total)),
            progress=lambda step, total, preview: steps.append(step),
        )
        assert [w for w, _, _ in heard[:1]] == ["loading model tiny-superres"]
        assert any(w.startswith("building onnx for ") for w, _, _ in heard), heard
        assert steps  # the phases came before the sampling steps, not instead of them
        heard.clear()
        again = {"model": str(superres_model), "scale": 2, "seed": 1, "backend": "onnx"}
        api.run("superres", photo, **again, phase=lambda *a: heard.append(a))
    assert heard == []  # loaded and exported already: nothing to announce


def test_each_thread_hears_only_its_own_run() -> None:
    heard: dict[str, list[str]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def work(name: str) -> None:
        with phases.listening(lambda what, done, total: heard[name].append(what)):
            barrier.wait()
            phases.announce(f"loading {name}")
            barrier.wait()

    threads = [threading.Thread(target=work, args=(n,)) for n in heard]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert heard == {"a": ["loading a"], "b": ["loading b"]}
    phases.announce("nobody listens")  # no listener: a no-op, not an error


def test_a_callers_listener_hears_the_runs_it_makes(superres_model: Path, photo: Path) -> None:
    heard: list[str] = []
    with using(Runtime()), phases.listening(lambda what, done, total: heard.append(what)):
        api.run("superres", photo, model=str(superres_model), scale=2, seed=1)  # no phase= of its own
    assert heard == ["loading model tiny-superres"]
