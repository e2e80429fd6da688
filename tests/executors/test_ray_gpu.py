"""A Ray folder job with --backend tensorrt --device cuda, end to end, with the GPU stand-ins in every worker."""

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
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow


def test_a_ray_job_on_tensorrt_cuda_matches_onnx(superres_model: Path, tmp_path: Path, monkeypatch) -> None:
    from difftool.executors.ray_data import start_ray

    rng = np.random.default_rng(1)
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(folder / f"s{i}.png")
    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))  # forwarded to the workers
    registry = build_registry(["ray_gpu_plugin"], entry_points=False)
    monkeypatch.setattr(cli, "_registry", lambda: registry)
    common = ["run", "superres", str(folder), "--model", str(superres_model), "--scale", "2", "--seed", "4"]
    if ray.is_initialized():
        ray.shutdown()  # another module's Ray, started without GPUs
    with gpu_harness():
        start_ray()
        try:
            assert ray.cluster_resources().get("GPU") == 2  # the stand-in's two GPUs, as Ray sees them
            result = CliRunner().invoke(cli.cli, [*common, "--backend", "tensorrt", "--device", "cuda",
                                                  "--executor", "ray", "--workers", "1", "--gpus-per-worker", "1",
                                                  "--json", "-o", str(tmp_path / "trt")])  # fmt: skip
        finally:
            ray.shutdown()
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["executor"] == "ray" and summary["ok"] == 3
    local = CliRunner().invoke(cli.cli, [*common, "--backend", "onnx", "--dtype", "fp16", "-o", str(tmp_path / "onnx")])
    assert local.exit_code == 0, local.output
    for name in ("s0", "s1", "s2"):
        trt, onnx = (Image.open(tmp_path / kind / f"{name}.png") for kind in ("trt", "onnx"))
        assert psnr(np.asarray(trt, np.float32) / 255, np.asarray(onnx, np.float32) / 255) > 40
    assert len([p for p in (tmp_path / "cache" / "tensorrt").iterdir() if p.is_dir()]) == 1  # one engine, reused
