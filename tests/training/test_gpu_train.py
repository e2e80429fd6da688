"""Training on a fast device (issue 33 item 4): batches made ahead by workers, a wall-clock deadline, the
device key, and benchmarks/gpu_train_superres.py's dry run (what a GPU machine would run) end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.training.data import ImagePool
from difftool.training.loader import batches
from difftool.training.train import TrainConfig, Trainer, step_batch

ROOT = Path(__file__).resolve().parents[2]


def tiny(**overrides) -> TrainConfig:
    settings = dict(steps=6, batch=2, crop=32, save_every=3, bf16=False, threads=1, builtin_data=False)
    settings.update(arch="srnet", scales=[2], channels=8, blocks=2, one_step_fraction=0.5, degradation="real")
    return TrainConfig.for_task("superres", **{**settings, **overrides})


def write_photos(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def pool(tmp_path: Path) -> ImagePool:
    return ImagePool.from_sources([write_photos(tmp_path / "images")], builtin=False)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and x["weight"] is None  # superres: all-ones weights stay behind
        for key in ("target", "cond", "noise", "t"):
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


def test_worker_stream_is_the_same_every_run_and_resumes_at_a_step(pool: ImagePool) -> None:
    config = tiny(workers=2)
    first = list(batches(config, pool, 0, 5, step_batch))
    assert_same_batches(first, list(batches(config, pool, 0, 5, step_batch)))
    assert_same_batches(first[3:], list(batches(config, pool, 3, 5, step_batch)))  # a run resumed at step 3
    assert_same_batches(first[1:2], [step_batch(config, pool, 1)])  # whatever process made it
    assert not torch.equal(first[0]["target"], first[1]["target"])
    assert first[0]["noise"].shape == first[0]["target"].shape == (2, 3, 32, 32)


def test_worker_run_resumes_exactly(pool: ImagePool, tmp_path: Path) -> None:
    straight = Trainer(tiny(workers=2), tmp_path / "a")
    straight.fit(pool, progress=False)
    first = Trainer(tiny(workers=2), tmp_path / "b")
    first.fit(pool, progress=False, stop_after=4)  # saved at 3 and at 4, then "killed"
    resumed = Trainer(tiny(workers=2), tmp_path / "b")
    assert resumed.resume() and resumed.step == 4
    resumed.fit(pool, progress=False)
    assert resumed.step == 6 and resumed.losses == pytest.approx(straight.losses)
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_deadline_stops_with_a_checkpoint_and_an_export(pool: ImagePool, tmp_path: Path) -> None:
    trainer = Trainer(tiny(save_every=100), tmp_path / "run")
    assert trainer.device == torch.device("cpu") and trainer.config.workers == 0  # the defaults: today's path
    trainer.fit(pool, progress=False, deadline=time.monotonic())
    assert trainer.step == 1
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 1
    assert json.loads((tmp_path / "run" / "model" / "difftool.json").read_text())["trained_steps"] == 1


def test_cuda_refused_without_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="set device to cpu"):
        Trainer(tiny(device="cuda"), tmp_path / "run")


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_train_superres", ROOT / "benchmarks" / "gpu_train_superres.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_train_superres", module)
    spec.loader.exec_module(module)
    return module


def test_gpu_configs_match_the_shipped_model_and_fit_the_machine() -> None:
    for scale in (2, 4):
        config = TrainConfig.from_file(ROOT / "difftool" / "training" / "configs" / f"superres-real-gpu-x{scale}.json")
        shipped = json.loads((ROOT / "difftool" / "models" / "superres-real" / f"x{scale}" / "config.json").read_text())
        assert (config.channels, config.blocks) == (shipped["channels"], shipped["blocks"])  # same CPU speed
        assert config.init == f"difftool/models/superres-real/x{scale}" and config.scales == [scale]
        assert config.device == "cuda" and 0 < config.workers < 16 and config.degradation == "real"
        assert config.batch * config.crop**2 >= 4 * 16 * 96**2  # 4x the CPU configs' pixels per step, or more


def test_gpu_script_dry_run_trains_packs_and_unpacks_models_that_run(tmp_path: Path, registry) -> None:
    from difftool.app import api

    script = load_script()
    out, photos = tmp_path / "out", write_photos(tmp_path / "photos")
    assert script.main(["--dry-run", "--out", str(out), "--photos", str(photos)]) == 0
    log = (out / "gpu_train_superres.log").read_text()
    assert "x2 done: 6 steps" in log and "x4 done: 6 steps" in log and "steps/s" in log
    assert "python -m difftool.training.embed superres runs/superres-real-gpu-x2 runs/superres-real-gpu-x4" in log
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())  # what comes back
    assert script.main(["--unpack", str(out), "-o", str(tmp_path / "runs")]) == 0
    for scale in (2, 4):
        run = tmp_path / "runs" / f"superres-real-gpu-x{scale}"
        state = json.loads((run / "checkpoint" / "state.json").read_text())
        assert state["step"] == 6 and state["config"]["device"] == "cpu" and state["config"]["workers"] == 2
        # the device's absolute paths become the config's repository-relative ones (the card finds them here)
        assert state["config"]["init"] == f"difftool/models/superres-real/x{scale}"
        assert state["config"]["folders"] == [str(photos)]  # outside the repository: kept as it was
        resumed = Trainer(TrainConfig(**state["config"]), run)
        assert resumed.resume() and resumed.step == 6  # the optimizer moments came back too
        result = api.run(
            "superres", Image.new("RGB", (12, 10), (9, 99, 199)), model=str(run / "model"), scale=str(scale),
            registry=registry,
        )  # fmt: skip
        assert result.image.size == (12 * scale, 10 * scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())")
def test_cuda_run_checkpoints_device_free_and_resumes_on_the_cpu(pool: ImagePool, tmp_path: Path) -> None:
    trainer = Trainer(tiny(device="cuda", bf16=True, workers=2), tmp_path / "run")
    trainer.fit(pool, progress=False)
    assert next(trainer.model.parameters()).is_cuda and np.isfinite(trainer.losses).all()
    resumed = Trainer(tiny(), tmp_path / "run")
    assert resumed.resume() and resumed.step == 6


def test_unpack_refuses_a_run_without_its_optimizer_and_leaves_nothing(tmp_path: Path) -> None:
    import tarfile

    script = load_script()
    back, runs = tmp_path / "back", tmp_path / "runs"
    run = tmp_path / "made" / "superres-real-gpu-x2"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "state.json").write_text("{}")
    back.mkdir()
    with tarfile.open(back / "superres-real-gpu-x2.tar", "w") as tar:
        tar.add(run / "checkpoint", arcname="checkpoint")
    with pytest.raises(SystemExit, match="optimizer.safetensors did not come back"):
        script.unpack(back, runs)
    assert not runs.exists() or not any(runs.iterdir())
    (back / "superres-real-gpu-x2.optimizer.safetensors").write_bytes(b"moments")
    (made,) = script.unpack(back, runs)
    assert (made / "checkpoint" / "optimizer.safetensors").read_bytes() == b"moments"
    assert sorted(p.name for p in runs.iterdir()) == ["superres-real-gpu-x2"]  # no partial folder left
    with pytest.raises(SystemExit, match="already holds a run"):
        script.unpack(back, runs)


def test_the_script_never_deletes_a_run_folder_it_did_not_make(tmp_path: Path) -> None:
    script = load_script()
    photos, work = write_photos(tmp_path / "photos"), tmp_path / "work"
    (work / "superres-real-gpu-x2").mkdir(parents=True)
    (work / "superres-real-gpu-x2" / "keep.txt").write_text("a run to resume")
    args = ["--dry-run", "--out", str(tmp_path / "out"), "--photos", str(photos), "--work", str(work)]
    with pytest.raises(SystemExit, match="exists; move it away"):
        script.main([*args, "--scales", "2"])
    assert (work / "superres-real-gpu-x2" / "keep.txt").read_text() == "a run to resume"
