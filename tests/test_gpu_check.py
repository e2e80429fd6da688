"""benchmarks/gpu_check.py, the check a borrowed GPU machine runs, stays runnable: its --dry-run on the CPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)
    spec.loader.exec_module(module)
    out = tmp_path / "report.md"
    assert module.main(["--dry-run", "--out", str(out), "--budget", "600"]) == 0
    report = out.read_text()
    for title in ("Environment", "pytest -m gpu", "Torch on the GPU against the CPU, per task",
                  "SD 1.5-size U-Net step", "SDXL-size U-Net step", "TensorRT"):  # fmt: skip
        assert f"## {title}\n" in report
    rest, _, tensorrt = report.partition("## TensorRT\n")
    assert "DRY RUN" in report and "failed" not in rest and "not run:" not in rest
    assert tensorrt.strip().startswith("not run")  # TensorRT needs a GPU (and, here, is not installed)
    assert "--collect-only" in report and "exit 0" in report and "test_embedded_model_on_cuda" in report
    assert "| superres | " in report and "| inpaint | " in report and " dB (bf16)" in report
    assert report.count("| diffusers UNet2DConditionModel, eager") == 2
    assert "| difftool torch backend (TorchDenoiser, channels-last) |" in report
