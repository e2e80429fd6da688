from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftool.app import api
from difftool.core.errors import ParameterError
from difftool.plugins.builtin.masks import crop_box, dilate, feather


def photo_and_mask(width: int = 64, height: int = 48) -> tuple[Image.Image, Image.Image, np.ndarray]:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[20:30, 40:50] = 200  # any non-zero value means repaint
    return image, Image.fromarray(mask), mask > 0


@pytest.mark.parametrize(("dilation", "feathering"), [(0, 0), (3, 0), (0, 6), (2, 5)])
def test_pixels_outside_the_feathered_mask_are_bit_exact(inpaint_model: Path, registry, dilation, feathering):
    image, mask_image, mask = photo_and_mask()
    result = api.run(
        "inpaint",
        image,
        mask=mask_image,
        dilate=dilation,
        feather=feathering,
        context=8,
        model=str(inpaint_model),
        registry=registry,
        seed=2,
        dtype="fp32",
    ).image
    before, after = np.asarray(image), np.asarray(result)
    reach = dilation + feathering
    outside = np.ones_like(mask)
    outside[20 - reach : 30 + reach, 40 - reach : 50 + reach] = False
    assert np.array_equal(before[outside], after[outside])
    assert not np.array_equal(before[mask], after[mask])


def test_mask_helpers() -> None:
    mask = np.zeros((9, 9), dtype=np.float32)
    mask[4, 4] = 1
    assert dilate(mask, 2).sum() == 25
    soft = feather(mask, 3)
    assert soft[4, 4] == 1 and 0 < soft[4, 6] < 1 and soft[0, 0] == 0
    assert crop_box(mask > 0, 2, (9, 9)) == (2, 7, 2, 7)


def test_empty_mask_returns_the_input(inpaint_model: Path, registry) -> None:
    image, _, _ = photo_and_mask()
    result = api.run("inpaint", image, mask=Image.new("L", image.size, 0), model=str(inpaint_model), registry=registry)
    assert result.image.tobytes() == image.tobytes()


def test_mask_of_another_size(inpaint_model: Path, registry) -> None:
    image, _, _ = photo_and_mask()
    small = Image.new("L", (16, 12), 0)
    small.putpixel((10, 5), 255)
    with pytest.raises(ParameterError, match="mask is 16x12 but the image is 64x48"):
        api.run("inpaint", image, mask=small, model=str(inpaint_model), registry=registry)
    result = api.run("inpaint", image, mask=small, resize_mask=True, model=str(inpaint_model), registry=registry)
    assert result.image.size == image.size


def test_mask_is_required(inpaint_model: Path, registry) -> None:
    image, _, _ = photo_and_mask()
    with pytest.raises(ParameterError, match="inpaint needs a mask.*--mask FILE.*--extend"):
        api.run("inpaint", image, model=str(inpaint_model), registry=registry)


def test_nan_weights_are_refused_naming_the_weight(tmp_path: Path, inpaint_model: Path, registry) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from difftool.core.errors import ModelError

    folder = tmp_path / "poisoned"
    shutil.copytree(inpaint_model, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = sorted(state)[0]
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, weights)
    with pytest.raises(ModelError, match=f"weight {key} contains NaN"):
        api.run(
            "inpaint", Image.new("RGB", (8, 8)), mask=Image.new("L", (8, 8), 255), model=str(folder), registry=registry
        )


def test_noise_fill_also_keeps_the_outside(inpaint_model: Path, registry) -> None:
    image, mask_image, mask = photo_and_mask()
    result = api.run(
        "inpaint", image, mask=mask_image, fill="noise", model=str(inpaint_model), registry=registry, seed=1
    ).image
    assert np.array_equal(np.asarray(image)[~mask], np.asarray(result)[~mask])
    assert result.size == image.size


def test_push_pull_fill_is_smooth_and_keeps_known_pixels() -> None:
    import torch

    from difftool.plugins.builtin.masks import push_pull_fill

    x = torch.zeros(1, 3, 20, 20)
    x[..., :10] = 1.0  # left half white, right half black
    known = torch.ones(1, 1, 20, 20)
    known[..., 5:15, 5:15] = 0
    filled = push_pull_fill(x * known, known)
    assert torch.equal(filled * known, x * known)
    hole = filled[0, 0, 5:15, 5:15]
    assert hole[:, 0].mean() > 0.6 and hole[:, -1].mean() < 0.4  # the colours flow in from each side
