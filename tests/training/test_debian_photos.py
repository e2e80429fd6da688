"""The Debian wallpaper photos for the real-world superres model: downscaled, clean, never the reserved set."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftool.training import debian_photos
from difftool.training.data import ImagePool


def _unpacked(root: Path) -> Path:
    """A stand-in for the unpacked packages: every listed photo as a small camera JPEG."""
    rng = np.random.default_rng(0)
    for index, (name, (package, _, _)) in enumerate(debian_photos.PHOTOS.items()):
        folder = root / package / "usr" / "share" / "backgrounds"
        folder.mkdir(parents=True, exist_ok=True)
        size = (120 + 8 * index, 90) if index % 2 else (90, 150)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name, quality=90)
    return root


def test_prepare_downscales_every_listed_photo_and_never_upscales(tmp_path: Path) -> None:
    written = debian_photos.prepare(tmp_path / "out", _unpacked(tmp_path / "debs"), long_side=100)
    assert sorted(p.name for p in written) == sorted(Path(n).stem + ".png" for n in debian_photos.PHOTOS)
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert max(image.size) <= 100
    small = debian_photos.prepare(tmp_path / "big", tmp_path / "debs", long_side=10_000)
    with (
        Image.open(small[0]) as image,
        Image.open(next((tmp_path / "debs").rglob(Path(small[0]).stem + ".jpg"))) as src,
    ):
        assert image.size == src.size  # a photo smaller than the long side is kept at its size
    pool = ImagePool.from_sources([tmp_path / "out"], builtin=False)
    assert len(pool.images) == len(debian_photos.PHOTOS)


def test_a_missing_photo_is_named(tmp_path: Path) -> None:
    debs = _unpacked(tmp_path / "debs")
    next(debs.rglob("Wine_by_Jakkub_Mede.jpg")).unlink()
    with pytest.raises(FileNotFoundError, match="Wine_by_Jakkub_Mede.jpg is not in lomiri-wallpapers-16.04"):
        debian_photos.prepare(tmp_path / "out", debs)


def test_the_evaluation_package_is_refused_before_anything_downloads(tmp_path: Path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match="mate-backgrounds is reserved for evaluation"):
        debian_photos.fetch({"lomiri-wallpapers-16.04": "20.04.0-2", "mate-backgrounds": "1.26.0-1"}, tmp_path)
    assert calls == []
    assert not set(debian_photos.PACKAGES) & set(debian_photos.RESERVED)


def test_the_model_card_names_each_folder_photo_and_its_licence(tmp_path: Path) -> None:
    from difftool.training.embed import _folder_photos

    written = debian_photos.prepare(tmp_path / "photos", _unpacked(tmp_path / "debs"), long_side=64)
    photos = dict(_folder_photos({"folders": [str(tmp_path / "photos")]}))
    assert len(photos) == len(written)
    assert photos["seeding_by_Clements_Engelhardt"] == ("lomiri-wallpapers-16.04", "Clemens Engelhardt", "CC0-1.0")
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "mystery.png")
    with pytest.raises(ValueError, match="without a known source and licence: mystery"):
        _folder_photos({"folders": [str(tmp_path / "photos")]})
    with pytest.raises(FileNotFoundError, match="training folder .*gone"):
        _folder_photos({"folders": [str(tmp_path / "gone")]})
