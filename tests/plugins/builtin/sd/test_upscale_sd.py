"""upscale-sd (A1111's SD upscale): tiles that cover the image, blend without seams, and repaint with SD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftool.app import api
from difftool.plugins.builtin.sd.upscale_sd import ramp, tile_starts

from . import tiny
from .test_parity import photo


@pytest.mark.parametrize(("length", "tile", "overlap"), [(80, 48, 16), (4096, 512, 64), (40, 48, 16), (97, 32, 8)])
def test_tiles_cover_the_side_overlap_enough_and_the_last_ends_at_the_edge(
    length: int, tile: int, overlap: int
) -> None:
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == max(0, length - tile)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_blend_weights_are_positive_everywhere_and_fade_across_the_overlap() -> None:
    inner = ramp(48, 16, before=True, after=True)
    assert inner.min() > 0 and inner[16:32].tolist() == [1.0] * 16
    assert np.all(np.diff(inner[:16]) > 0) and np.all(np.diff(inner[-16:]) < 0)
    assert ramp(48, 16, before=False, after=False).tolist() == [1.0] * 48
    # Two neighbours' weights over their shared overlap sum to a constant: a uniform image stays uniform.
    first, second = ramp(48, 16, False, True)[-16:], ramp(48, 16, True, False)[:16]
    assert np.allclose(first + second, first[0] + second[0])


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_folder(tiny.components(seed=4), tmp_path_factory.mktemp("sd") / "tiny")


def test_upscale_sd_repaints_tile_by_tile_at_the_target_size(folder: Path) -> None:
    source = photo((40, 32))
    common = {"model": str(folder), "prompt": "a field", "scale": 2.0, "upscaler": "lanczos", "tile": 48}
    common |= {"overlap": 16, "strength": 0.5, "steps": 4, "seed": 2, "dtype": "fp32"}
    result = api.run("upscale-sd", source, **common)
    assert result.images[0].size == (80, 64) and result.record["tiles"] == 4
    again = api.run("upscale-sd", source, **common)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(again.images[0]))  # reproducible
    lanczos = np.asarray(source.resize((80, 64), Image.Resampling.LANCZOS), np.float32)
    assert np.abs(np.asarray(result.images[0], np.float32) - lanczos).mean() > 2  # repainted, not just resized
    with pytest.raises(Exception, match="multiple of 8"):
        api.run("upscale-sd", source, **{**common, "tile": 50})
