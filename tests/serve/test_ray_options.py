"""``difftool serve --ray`` without Ray: the options, the one-line errors, and the job board's rules."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from click.testing import CliRunner

from difftool.core.errors import ParameterError
from difftool.serve.board import JobBoard
from difftool.serve.ray_serve import RayOptions, replica_resources
from difftool.serve.settings import ServeSettings


def _invoke(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[Any, list[tuple[ServeSettings, RayOptions]]]:
    from difftool.serve import command, ray_serve

    calls: list[tuple[ServeSettings, RayOptions]] = []
    monkeypatch.setattr(ray_serve, "serve_on_ray", lambda settings, options: calls.append((settings, options)))
    return CliRunner().invoke(command.serve, list(args)), calls


def test_the_command_passes_the_ray_options(monkeypatch: pytest.MonkeyPatch) -> None:
    result, calls = _invoke(monkeypatch, "--ray", "auto", "--replicas", "3", "--cpus-per-replica", "2", "--port", "9")
    assert result.exit_code == 0, result.output
    settings, options = calls[0]
    assert (options.address, options.replicas, options.cpus_per_replica, options.gpus_per_replica) == (
        "auto",
        3,
        2,
        None,
    )
    assert settings.port == 9 and settings.host == "127.0.0.1"
    result, calls = _invoke(monkeypatch, "--ray", "--replicas", "2")  # no ADDRESS: a local Ray
    assert result.exit_code == 0 and calls[0][1].address is None and calls[0][1].replicas == 2


def test_ray_options_without_ray_and_unsafe_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    result, calls = _invoke(monkeypatch, "--replicas", "2")
    assert result.exit_code == 2 and "--replicas and --gpus-per-replica need --ray" in result.output and not calls
    result, calls = _invoke(monkeypatch, "--ray", "--host", "0.0.0.0")
    assert result.exit_code == 2 and "--api-token" in result.output and not calls


def test_a_missing_ray_serve_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from difftool.serve import command

    monkeypatch.setitem(sys.modules, "ray", None)
    result = CliRunner().invoke(command.serve, ["--ray", "--replicas", "1"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and 'pip install "difftool[serve,ray]"' in result.output


def test_replica_resources() -> None:
    settings = ServeSettings()
    assert replica_resources(settings, RayOptions(cpus_per_replica=4)) == ("cpu", {"num_cpus": 4, "num_gpus": 0.0})
    cuda = ServeSettings(devices=("cuda:1",))
    assert replica_resources(cuda, RayOptions()) == ("cuda", {"num_cpus": 1.0, "num_gpus": 1.0})
    assert replica_resources(cuda, RayOptions(gpus_per_replica=0.5))[1]["num_gpus"] == 0.5
    with pytest.raises(ParameterError, match="--gpus-per-replica 1"):
        replica_resources(cuda, RayOptions(gpus_per_replica=0))
    with pytest.raises(ParameterError, match="one device per model replica"):
        replica_resources(ServeSettings(devices=("cpu", "cuda:0")), RayOptions())
    with pytest.raises(ParameterError, match="mps"):
        replica_resources(ServeSettings(devices=("mps",)), RayOptions())


def _status(job_id: str, state: str, step: int = 0) -> dict[str, Any]:
    return {"id": job_id, "state": state, "step": step, "error": None, "error_type": None, "eta_seconds": None}


def _update(job_id: str, version: int, state: str, **extra: Any) -> dict[str, Any]:
    return {"id": job_id, "version": version, "status": _status(job_id, state, version), "preview_step": 0, **extra}


def test_the_board_keeps_the_newest_version_and_never_reopens_an_ended_job() -> None:
    board = JobBoard()
    board.publish("a", [_update("j", 1, "queued"), _update("j", 3, "running")])
    board.publish("a", [_update("j", 2, "running")])  # late: an older version
    assert board.get("j")["version"] == 3
    board.publish("a", [_update("j", 4, "done", files=[b"png"])])
    board.publish("a", [_update("j", 5, "running")])  # a stale worker cannot reopen it
    assert board.get("j")["status"]["state"] == "done" and board.result("j") == [b"png"]
    assert board.get("nope") is None and board.result("nope") == []


def test_the_board_cancels_queued_jobs_at_once_and_flags_running_ones() -> None:
    board = JobBoard()
    board.publish("a", [_update("q", 1, "queued"), _update("r", 1, "running")])
    board.cancel("q")
    board.cancel("r")
    assert board.get("q")["status"]["state"] == "cancelled" and board.get("q")["status"]["error_type"] == "Cancelled"
    assert board.get("r")["status"]["state"] == "running" and board.get("r")["cancel"]
    assert sorted(board.publish("a", [])) == ["q", "r"]  # replica a is told to stop both
    assert board.publish("b", []) == []
    assert [e["status"]["id"] for e in board.active()] == ["r"]


def test_a_silent_replicas_jobs_fail_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import difftool.serve.board as board_module

    now = [100.0]
    monkeypatch.setattr(board_module.time, "monotonic", lambda: now[0])
    board = JobBoard(stale_after=5)
    board.publish("a", [_update("x", 1, "running")])
    board.publish("b", [_update("y", 1, "running")])
    now[0] = 104.0
    board.publish("b", [])  # b is alive, a has been silent for 4 s
    assert board.get("x")["status"]["state"] == "running"
    now[0] = 106.0
    lost = board.get("x")["status"]
    assert lost["state"] == "failed" and lost["error_type"] == "ReplicaLost" and "submit the job again" in lost["error"]
    assert board.get("y")["status"]["state"] == "running"
    assert [e["status"]["id"] for e in board.active()] == ["y"]


def test_the_board_forgets_the_oldest_ended_jobs_beyond_keep() -> None:
    board = JobBoard(keep=2)
    board.publish("a", [_update(f"j{i}", 1, "done") for i in range(4)] + [_update("live", 1, "running")])
    assert [board.get(f"j{i}") is not None for i in range(4)] == [False, False, True, True]
    assert board.get("live") is not None
    assert board.get_options({"sd_model_checkpoint": "m"}) == {"sd_model_checkpoint": "m"}
    board.set_option("sd_model_checkpoint", "n")
    assert board.get_options({"sd_model_checkpoint": "m"}) == {"sd_model_checkpoint": "n"}  # first one wins


def test_a_run_carries_the_requested_dtype_not_the_one_resolved_for_the_http_replicas_cpu() -> None:
    from difftool.app.plan import preflight
    from difftool.serve.job_queue import Job
    from difftool.serve.ray_worker import RemoteJobQueue

    queue = RemoteJobQueue(None, "http-1", None, "cuda", devices=("cpu",))
    try:
        plan = preflight("superres", params={"scale": 2}, device="cpu")  # auto: bf16 on this CPU
        asked, unset = Job(plan, ["image"], [5]), Job(plan, ["image"], [5])
        queue.dtypes[asked.id] = "fp16"
        spec = queue.spec(asked, 5)
        assert plan.backend.dtype != "auto" and spec["fields"]["dtype"] == "fp16"
        assert spec["task"] == "superres" and spec["inputs"] == ["image"] and spec["seed"] == 5
        assert spec["params"]["scale"] == 2 and spec["job"] == asked.id
        assert queue.spec(unset, 5)["fields"]["dtype"] == "auto"  # the model replica resolves it for its device
    finally:
        queue.stop(0)
