from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.training.data import CORPUS, HOLDOUT, ImagePool, builtin_corpus
from difftool.training.degrade import degrade_for_superres, random_mask
from difftool.training.train import TrainConfig, Trainer


def tiny(task: str, **overrides) -> TrainConfig:
    return TrainConfig.for_task(
        task,
        steps=6,
        batch=2,
        crop=32,
        block_out_channels=[8, 16],
        save_every=3,
        bf16=False,
        threads=1,
        builtin_data=False,
        **overrides,
    )


@pytest.fixture
def pool(tmp_path: Path) -> ImagePool:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return ImagePool.from_sources([folder], builtin=False)


@pytest.mark.parametrize("task", ["superres", "inpaint"])
def test_resumed_run_continues_exactly(task: str, pool: ImagePool, tmp_path: Path) -> None:
    straight = Trainer(tiny(task), tmp_path / "a")
    straight.fit(pool, progress=False)

    first = Trainer(tiny(task), tmp_path / "b")
    first.fit(pool, progress=False, stop_after=3)  # checkpoint at step 3, then "killed"
    resumed = Trainer(tiny(task), tmp_path / "b")
    assert resumed.resume() and resumed.step == 3
    resumed.fit(pool, progress=False)
    assert resumed.step == 6
    assert resumed.losses == pytest.approx(straight.losses)
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    model = tmp_path / "b" / "model"
    assert (model / "diffusion_pytorch_model.safetensors").is_file() and (model / "difftool.json").is_file()


def test_exported_model_runs_in_its_task(pool: ImagePool, tmp_path: Path, registry) -> None:
    from difftool.app import api

    trainer = Trainer(tiny("superres"), tmp_path / "run")
    trainer.fit(pool, progress=False)
    result = api.run(
        "superres",
        Image.new("RGB", (12, 10), (9, 99, 199)),
        model=str(tmp_path / "run" / "model"),
        scale="4",
        registry=registry,
    )
    assert result.image.size == (48, 40)


def assert_resumes_exactly(config: Callable[[], TrainConfig], pool: ImagePool, tmp_path: Path) -> None:
    """A run stopped at step 3 and resumed in ``tmp_path / "b"`` ends with the losses of a straight run."""
    straight = Trainer(config(), tmp_path / "a")
    straight.fit(pool, progress=False)
    first = Trainer(config(), tmp_path / "b")
    first.fit(pool, progress=False, stop_after=3)
    resumed = Trainer(config(), tmp_path / "b")
    assert resumed.resume() and resumed.step == 3
    resumed.fit(pool, progress=False)
    assert resumed.losses == pytest.approx(straight.losses)


def test_srnet_run_resumes_exactly_and_exports_a_working_model(pool: ImagePool, tmp_path: Path, registry) -> None:
    from difftool.app import api

    def config() -> TrainConfig:
        return tiny("superres", arch="srnet", scales=[2], channels=8, blocks=2, one_step_fraction=0.5)

    assert_resumes_exactly(config, pool, tmp_path)
    result = api.run(
        "superres",
        Image.new("RGB", (12, 10), (9, 99, 199)),
        model=str(tmp_path / "b" / "model"),
        scale="2",
        registry=registry,
    )
    assert result.image.size == (24, 20)
    pytest.importorskip("skimage", reason="the test extra installs scikit-image")
    from difftool.training.evaluate import evaluate

    rows = evaluate(tmp_path / "b" / "model", "superres", limit=1)  # what `difftool train` prints at the end
    assert [row["scale"] for row in rows] == [2]  # only the scale this one-scale model offers
    with pytest.raises(ValueError, match="one scale"):
        Trainer(tiny("superres", arch="srnet", scales=[2, 4]), tmp_path / "c")


def test_one_step_fraction_trains_at_the_last_timestep(tmp_path: Path) -> None:
    trainer = Trainer(
        tiny("superres", arch="srnet", scales=[4], channels=8, blocks=1, one_step_fraction=0.6, few_step_fraction=0.2),
        tmp_path / "t",
    )
    t = trainer.sample_timesteps(4000)
    assert 0.62 < float((t == 999).float().mean()) < 0.7  # 0.6 plus the uniform and few-step draws of 999


def test_holdout_is_never_in_the_training_corpus() -> None:
    assert len(HOLDOUT) >= 4 and set(HOLDOUT) <= set(CORPUS)
    names = {image.name for image in builtin_corpus("train")}
    assert names and not names & set(HOLDOUT)


def test_degradations() -> None:
    rng = np.random.default_rng(0)
    hr = rng.random((32, 32, 3)).astype(np.float32)
    for _ in range(4):
        low = degrade_for_superres(hr, 4, rng)
        assert low.shape == (8, 8, 3) and 0 <= low.min() and low.max() <= 1
    areas = [random_mask(64, rng).mean() for _ in range(40)]
    assert min(areas) >= 0.04 and max(areas) <= 0.5


def test_inpaintnet_run_resumes_exactly_and_exports_a_noise_fill_model(
    pool: ImagePool, tmp_path: Path, registry
) -> None:
    from difftool.app import api

    def config() -> TrainConfig:
        return tiny("inpaint", arch="inpaintnet", channels=8, blocks=4, texture_weight=1.0)

    assert_resumes_exactly(config, pool, tmp_path)
    mask = Image.new("L", (20, 12), 0)
    mask.paste(255, (4, 4, 12, 9))
    image = Image.new("RGB", (20, 12), (9, 99, 199))
    result = api.run("inpaint", image, mask=mask, model=str(tmp_path / "b" / "model"), registry=registry)
    assert result.record["fill"] == "noise"  # the model's own default: it fills the hole itself
    assert result.image.size == (20, 12)
    with pytest.raises(ValueError, match="inpaint"):
        Trainer(tiny("superres", arch="inpaintnet"), tmp_path / "c")


def test_texture_loss_asks_for_detail_and_not_for_a_dither() -> None:
    from difftool.training.train import texture_loss

    g = torch.Generator().manual_seed(0)
    photo = torch.nn.functional.interpolate(torch.randn(2, 3, 24, 24, generator=g), size=96, mode="bilinear")
    mask = torch.zeros(2, 1, 96, 96)
    mask[..., 32:64, 32:64] = 1
    flat = torch.zeros_like(photo)
    checkerboard = (torch.arange(96)[:, None] + torch.arange(96)[None]) % 2 * 0.5 - 0.25
    dither = checkerboard.expand_as(photo)
    shifted = torch.roll(photo, shifts=(5, 7), dims=(2, 3))  # as much detail, other places
    assert float(texture_loss(photo, photo, mask)) == 0.0
    assert float(texture_loss(shifted, photo, mask)) < 0.5 * float(texture_loss(flat, photo, mask))
    assert float(texture_loss(dither, photo, mask)) > float(texture_loss(shifted, photo, mask))
    outside = photo.clone()
    outside[..., :4, :] = 5.0  # only the mask and its neighbourhood count
    assert float(texture_loss(outside, photo, mask)) == 0.0


def test_masks_include_scratches_and_objects_like_users_paint() -> None:
    rng = np.random.default_rng(3)
    masks = [random_mask(128, rng) for _ in range(60)]
    assert all(0.04 <= m.mean() <= 0.5 for m in masks)
    assert len({round(float(m.mean()), 3) for m in masks}) > 40  # varied, not one shape repeated


def test_real_mix_picks_the_kinds_of_real_world_input() -> None:
    from difftool.training.degrade import degrade_real, downscale

    hr = np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)
    clean = {"clean": 1.0, "jpeg": 0.0, "second_order": 0.0}
    assert np.array_equal(degrade_real(hr, 2, np.random.default_rng(0), clean), downscale(hr, 2))
    jpeg_only = degrade_real(hr, 2, np.random.default_rng(0), {"clean": 0.0, "jpeg": 1.0, "second_order": 0.0})
    assert jpeg_only.shape == (32, 32, 3) and not np.array_equal(jpeg_only, downscale(hr, 2))
    with pytest.raises(ValueError, match="add up to 1"):
        degrade_real(hr, 2, np.random.default_rng(0), {"clean": 0.5, "jpeg": 0.0, "second_order": 0.0})
    with pytest.raises(ValueError, match="add up to 1"):  # a config says so when it is read, not in a worker
        TrainConfig.for_task("superres", degradation="real", real_mix={"clean": 1.0, "jpeg": 0.5})
