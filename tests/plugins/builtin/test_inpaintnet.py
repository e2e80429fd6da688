from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.app import api
from difftool.plugins.builtin.inpaintnet import InpaintNet, pyramid_fill


def holed(height: int = 36, width: int = 52) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, height, width, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, height, width)
    mask[..., 8:28, 10:30] = 1
    return image, mask


def test_pyramid_fill_keeps_known_pixels_and_fills_holes_from_them() -> None:
    image, mask = holed()
    known = 1 - mask
    filled = pyramid_fill(image * known, known)
    assert torch.equal(filled * known, image * known)
    hole = filled[..., 8:28, 10:30]
    assert float(hole.min()) >= float(image.min()) and float(hole.max()) <= float(image.max())
    assert float(hole.std()) > 0  # colours flow in from the border, not one flat value
    # A constant image is filled with that constant; an image with nothing known stays finite.
    constant = torch.full_like(image, 0.25)
    torch.testing.assert_close(pyramid_fill(constant * known, known), constant)
    assert bool(torch.isfinite(pyramid_fill(image, torch.zeros_like(mask))).all())


@pytest.mark.parametrize(("height", "width"), [(36, 52), (8, 200), (64, 64)])
def test_inpaintnet_returns_known_pixels_unchanged_and_starts_as_the_pyramid_fill(height: int, width: int) -> None:
    image, mask = holed(max(height, 36), max(width, 52))
    image, mask = image[..., :height, :width], mask[..., :height, :width]
    net = InpaintNet(channels=8, fine_channels=8, dilations=(1, 2), embed_dim=16).eval()
    noisy = torch.randn_like(image)
    with torch.no_grad():
        out = net(torch.cat([noisy, image * (1 - mask), mask], 1), torch.tensor(999)).sample
    assert out.shape == image.shape
    assert torch.equal(out * (1 - mask), image * (1 - mask))
    torch.testing.assert_close(out, pyramid_fill(image * (1 - mask), 1 - mask))  # the tail starts at zero


def test_inpaint_task_runs_inpaintnet_with_its_default_fill(inpaintnet_model: Path, registry) -> None:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (30, 46, 3), dtype=np.uint8))  # not multiples of 4
    mask = np.zeros((30, 46), dtype=np.uint8)
    mask[10:20, 12:30] = 255
    kwargs = {"mask": Image.fromarray(mask), "model": str(inpaintnet_model), "registry": registry, "seed": 4}
    result = api.run("inpaint", image, **kwargs)
    assert result.record["fill"] == "noise"
    before, after = np.asarray(image), np.asarray(result.image)
    assert np.array_equal(before[mask == 0], after[mask == 0])
    assert not np.array_equal(before[mask > 0], after[mask > 0])
    again = api.run("inpaint", image, **kwargs)
    assert np.array_equal(np.asarray(again.image), after)  # one seed, one result
    blur = api.run("inpaint", image, fill="blur", **kwargs)  # still accepted: refine the classical fill
    assert blur.record["fill"] == "blur" and np.array_equal(np.asarray(blur.image)[mask == 0], before[mask == 0])
