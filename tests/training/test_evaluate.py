import numpy as np
import pytest
from PIL import Image, ImageFilter

from difftool.training.evaluate import histogram_distance, inpaint_masks, inpaint_scores, texture_ratio


@pytest.fixture
def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(1.5)))


def test_texture_ratio_tells_a_smear_from_a_detailed_fill(photo: np.ndarray) -> None:
    mask = np.zeros(photo.shape[:2], dtype=bool)
    mask[20:70, 30:100] = True
    smear = photo.copy()
    smear[mask] = np.asarray(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(6)))[mask]
    elsewhere = photo.copy()
    elsewhere[mask] = np.roll(photo, 40, axis=1)[mask]  # as much detail, wrong place
    assert texture_ratio(photo, photo, mask) == pytest.approx(1.0)
    assert texture_ratio(photo, smear, mask) < 0.2
    assert 0.7 < texture_ratio(photo, elsewhere, mask) < 1.3
    assert histogram_distance(photo, photo, mask) == 0.0
    grey = photo.copy()
    grey[mask] = 10  # one dark colour the photo does not have
    assert histogram_distance(photo, grey, mask) > 0.9 > histogram_distance(photo, elsewhere, mask)
    scores = inpaint_scores(photo, smear, mask)
    assert set(scores) == {"psnr", "ssim", "texture", "hist"} and scores["psnr"] > 20


def test_benchmark_masks_are_fixed_and_object_sized() -> None:
    first, second = inpaint_masks((300, 200), 2), inpaint_masks((300, 200), 2)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert 0.05 < first["object"].mean() < 0.12
    ys, xs = np.nonzero(first["object"])
    assert ys.min() > 0 and xs.min() > 0 and ys.max() < 199 and xs.max() < 299
