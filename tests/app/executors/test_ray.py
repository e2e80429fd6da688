"""Folder jobs on a local Ray (2 CPUs): same files as a local batch, resume, corrupt inputs, killed actors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from difftool import cli
from difftool.plugins.registry import build_registry
from difftool.testing.gpu import gpu_harness
from difftool.training.evaluate import psnr

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    from difftool.app.executors.ray_data import start_ray

    start_ray()
    yield
    ray.shutdown()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "shots"
    (root / "b").mkdir(parents=True)
    for i, name in enumerate(["a1.png", "a2.png", "b/b1.png", "b/b2.png", "c.png", "d.png"]):
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(root / name)
    return root


def cli_run(monkeypatch, *args: object, plugins: tuple[str, ...] = ()):
    registry = build_registry(list(plugins), entry_points=False)
    return CliRunner().invoke(cli.cli, ["run", *[str(a) for a in args]], obj=registry)


def report(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]


def test_ray_writes_the_same_files_as_a_local_batch_and_resumes(
    folder: Path, superres_model: Path, tmp_path: Path, monkeypatch
) -> None:
    common = ("superres", folder, "--model", superres_model, "--scale", "2", "--seed", 5, "--dtype", "fp32")
    local = cli_run(monkeypatch, *common, "-o", tmp_path / "local")
    assert local.exit_code == 0, local.output
    distributed = cli_run(monkeypatch, *common, "-o", tmp_path / "ray", "--executor", "ray", "--workers", 2, "--json")
    assert distributed.exit_code == 0, distributed.output
    summary = json.loads(distributed.stdout)
    assert summary["executor"] == "ray" and summary["ok"] == 6 and summary["failed"] == 0
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*.png"))
    assert len(files) == 6 and files == sorted(
        p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*.png")
    )
    for rel in files:
        a, b = (np.asarray(Image.open(tmp_path / d / rel)) for d in ("local", "ray"))
        assert np.array_equal(a, b), rel
    rows = report(tmp_path / "ray")
    assert [r["key"] for r in rows] == ["a1.png", "a2.png", "b/b1.png", "b/b2.png", "c.png", "d.png"]
    assert all(r["status"] == "ok" and r["worker"] and r["seconds"] >= 0 for r in rows)

    again = cli_run(monkeypatch, *common, "-o", tmp_path / "ray", "--executor", "ray", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["skipped"] == 6
    assert {r["status"] for r in report(tmp_path / "ray")} == {"skipped"}


def test_a_corrupt_input_is_reported_and_the_rest_are_written(
    folder: Path, superres_model: Path, tmp_path: Path, monkeypatch
) -> None:
    (folder / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    result = cli_run(monkeypatch, "superres", folder, "--model", superres_model, "--scale", "2", "-o", out,
                     "--executor", "ray", "--json")  # fmt: skip
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["failed_inputs"] == ["c.png"] and summary["ok"] == 5
    bad = next(r for r in report(out) if r["key"] == "c.png")
    assert bad["status"] == "failed" and "c.png" in bad["error"] or "cannot" in bad["error"]
    assert not (out / "c.png").exists() and len(list(out.rglob("*.png"))) == 5


def test_a_killed_actor_is_retried_and_no_output_is_lost(folder: Path, tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "crashed"
    monkeypatch.setenv("DIFFTOOL_TEST_CRASH_MARKER", str(marker))
    ray.shutdown()  # restart so the workers inherit the marker's environment variable
    from difftool.app.executors.ray_data import start_ray

    start_ray()
    out = tmp_path / "out"
    result = cli_run(monkeypatch, "crash-once", folder, "-o", out, "--executor", "ray", "--workers", 1, "--json",
                     plugins=("ray_crash_plugin",))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert marker.exists()  # a worker really died mid-job
    rows = report(out)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    for row in rows:
        source = np.asarray(Image.open(folder / row["key"]))
        assert np.array_equal(np.asarray(Image.open(out / row["key"])), source)
    assert not list(out.rglob(".*"))  # no temp files left behind


def test_a_batchable_task_runs_in_batches_with_the_same_results(folder: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    result = cli_run(monkeypatch, "copy-batched", folder, "-o", out, "--executor", "ray", "--workers", 1, "--json",
                     plugins=("ray_crash_plugin",))  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = report(out)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    assert len({r["worker"] for r in rows}) == 1  # one actor took them all, several per call
    for row in rows:
        assert np.array_equal(np.asarray(Image.open(out / row["key"])), np.asarray(Image.open(folder / row["key"])))


def test_inputs_given_as_uris_run_locally_and_on_ray(folder: Path, tmp_path: Path, monkeypatch) -> None:
    """pyarrow-readable URIs (file:// here; s3://, gs:// alike): listed, read by the workers, named by relative path."""
    uri = folder.resolve().as_uri()
    local = cli_run(monkeypatch, "copy-batched", uri, "-o", tmp_path / "local", plugins=("ray_crash_plugin",))
    assert local.exit_code == 0, local.output
    remote = cli_run(monkeypatch, "copy-batched", uri, "-o", tmp_path / "ray", "--executor", "ray",
                     plugins=("ray_crash_plugin",))  # fmt: skip
    assert remote.exit_code == 0, remote.output
    rows = report(tmp_path / "ray")
    assert [r["key"] for r in rows] == ["a1.png", "a2.png", "b/b1.png", "b/b2.png", "c.png", "d.png"]
    assert rows[2]["input"] == f"{uri}/b/b1.png"
    for row in rows:
        expected = np.asarray(Image.open(folder / row["key"]))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "ray" / row["key"])), expected)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "local" / row["key"])), expected)
    missing = cli_run(monkeypatch, "copy-batched", uri, plugins=("ray_crash_plugin",))
    assert missing.exit_code == 2 and "need an output folder" in missing.stderr


def test_a_community_upscaler_runs_on_ray_like_locally(folder: Path, tmp_path: Path, monkeypatch) -> None:
    import torch
    from safetensors.torch import save_file

    from difftool.plugins.builtin.upscalers import import_spandrel

    import_spandrel()
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    model = tmp_path / "2x-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in Compact(num_feat=8, num_conv=2, upscale=2).state_dict().items()}, model)
    common = ("superres", folder, "--model", model, "--dtype", "fp32")
    local = cli_run(monkeypatch, *common, "-o", tmp_path / "local")
    distributed = cli_run(monkeypatch, *common, "-o", tmp_path / "ray", "--executor", "ray", "--workers", 2, "--json")
    assert local.exit_code == 0 and distributed.exit_code == 0, distributed.output
    assert json.loads(distributed.stdout)["ok"] == 6
    for path in (tmp_path / "local").rglob("*.png"):
        other = tmp_path / "ray" / path.relative_to(tmp_path / "local")
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(other)))
        assert Image.open(path).size == tuple(
            2 * s for s in Image.open(folder / path.relative_to(tmp_path / "local")).size
        )


# --- --backend tensorrt --device cuda on Ray, with the GPU stand-ins in every worker (last: it restarts Ray) ---


def test_a_ray_job_on_tensorrt_cuda_matches_onnx(superres_model: Path, tmp_path: Path, monkeypatch) -> None:
    from difftool.app.executors.ray_data import start_ray

    rng = np.random.default_rng(1)
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(folder / f"s{i}.png")
    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))  # forwarded to the workers
    registry = build_registry(["ray_gpu_plugin"], entry_points=False)
    common = ["run", "superres", str(folder), "--model", str(superres_model), "--scale", "2", "--seed", "4"]
    if ray.is_initialized():
        ray.shutdown()  # the module's Ray, started without GPUs
    with gpu_harness():
        start_ray()
        try:
            assert ray.cluster_resources().get("GPU") == 2  # the stand-in's two GPUs, as Ray sees them
            result = CliRunner().invoke(cli.cli, [*common, "--backend", "tensorrt", "--device", "cuda",
                                                  "--executor", "ray", "--workers", "1", "--gpus-per-worker", "1",
                                                  "--json", "-o", str(tmp_path / "trt")], obj=registry)  # fmt: skip
        finally:
            ray.shutdown()
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["executor"] == "ray" and summary["ok"] == 3
    local = CliRunner().invoke(
        cli.cli, [*common, "--backend", "onnx", "--dtype", "fp16", "-o", str(tmp_path / "onnx")], obj=registry
    )
    assert local.exit_code == 0, local.output
    for name in ("s0", "s1", "s2"):
        trt, onnx = (Image.open(tmp_path / kind / f"{name}.png") for kind in ("trt", "onnx"))
        assert psnr(np.asarray(trt, np.float32) / 255, np.asarray(onnx, np.float32) / 255) > 40
    assert len([p for p in (tmp_path / "cache" / "tensorrt").iterdir() if p.is_dir()]) == 1  # one engine, reused
