import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftool.app import api
from difftool.core.errors import ImageTooLargeError, ParameterError
from difftool.core.tiling import blend_weights, tile_spans


def upscale(image, model: Path, registry, **params) -> np.ndarray:
    params.setdefault("scale", "2")
    result = api.run("superres", image, model=str(model), seed=4, dtype="fp32", registry=registry, **params)
    return np.asarray(result.image).astype(np.float64)


def textured(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(xx / 5.0), np.cos(yy / 7.0), np.sin((xx + yy) / 3.0)], axis=2) * 0.35 + 0.5
    noisy = base + rng.normal(0, 0.05, base.shape)
    return Image.fromarray((np.clip(noisy, 0, 1) * 255).astype(np.uint8))


def test_tile_spans_cover_and_overlap() -> None:
    spans = tile_spans(100, 40, 10)
    assert spans[0][0] == 0 and spans[-1][1] == 100
    assert all(b[0] <= a[1] - 10 for a, b in zip(spans, spans[1:], strict=False))
    assert tile_spans(30, 40, 10) == [(0, 30)]


def test_blend_weights_sum_to_one_where_tiles_meet() -> None:
    spans = tile_spans(100, 40, 12)
    total = np.zeros(100)
    for span in spans:
        total[span[0] : span[1]] += blend_weights(span, (0, 1), (100, 1), 12)[:, 0].numpy()
    assert total.min() > 0.3  # every pixel is covered with weight; the division normalises


@pytest.mark.parametrize("kind", ["flat", "textured"])
def test_tiled_matches_untiled_without_seams(kind: str, embedded_superres: Path, registry) -> None:
    # The shipped model: a random-weight one has no small residual to compare, only GroupNorm noise.
    image = Image.new("RGB", (60, 44), (90, 140, 200)) if kind == "flat" else textured(60, 44)
    whole = upscale(image, embedded_superres, registry, tile=512, overlap=64)  # one tile
    tiled = upscale(image, embedded_superres, registry, tile=48, overlap=16)  # 4 x 3 tiles
    diff = np.abs(whole - tiled)
    assert diff.mean() < 0.5 and diff.max() <= 6.0, (diff.mean(), diff.max())  # of 255 levels

    # Seam metric: the strongest column-to-column jump of the tiled image is no stronger than the untiled one's.
    def column_jumps(a: np.ndarray) -> np.ndarray:
        return np.abs(np.diff(a, axis=1)).mean(axis=(0, 2))

    assert column_jumps(tiled).max() <= column_jumps(whole).max() * 1.05 + 0.1


def test_one_tile_is_the_untiled_result(superres_model: Path, registry) -> None:
    image = textured(30, 20)
    assert np.array_equal(
        upscale(image, superres_model, registry, tile=512), upscale(image, superres_model, registry, tile=2048)
    )


def test_alpha_is_upscaled_and_reattached(superres_model: Path, registry) -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = 128
    rgba[4:12, 4:12, 3] = 255
    out = upscale(Image.fromarray(rgba, "RGBA"), superres_model, registry)
    assert out.shape == (32, 32, 4)
    assert out[16, 16, 3] == 255 and out[0, 0, 3] == 0


def test_keep_mode_grayscale_and_16_bit(superres_model: Path, registry, tmp_path: Path) -> None:
    gray = Image.linear_gradient("L").resize((24, 16))
    assert (
        api.run(
            "superres", gray, model=str(superres_model), scale="2", keep_mode=True, registry=registry, dtype="fp32"
        ).image.mode
        == "L"
    )
    assert (
        api.run("superres", gray, model=str(superres_model), scale="2", registry=registry, dtype="fp32").image.mode
        == "RGB"
    )
    deep = Image.fromarray(np.arange(24 * 16, dtype=np.uint16).reshape(16, 24) * 170)
    deep.save(tmp_path / "deep.png")
    result = api.run(
        "superres",
        tmp_path / "deep.png",
        model=str(superres_model),
        scale="2",
        keep_mode=True,
        registry=registry,
        dtype="fp32",
    ).image
    assert result.mode == "I;16" and result.size == (48, 32)
    values = np.asarray(result)
    assert len(np.unique(values)) > 256  # more levels than 8 bits could hold


def test_output_over_the_pixel_limit_is_refused_before_work(superres_model: Path, registry, monkeypatch) -> None:
    monkeypatch.setenv("DIFFTOOL_MAX_PIXELS", str(64 * 64))
    with pytest.raises(ImageTooLargeError, match="4x output"):
        api.run("superres", Image.new("RGB", (32, 32)), model=str(superres_model), scale="4", registry=registry)


def test_overlap_must_be_smaller_than_tile(superres_model: Path, registry) -> None:
    with pytest.raises(ParameterError, match="--overlap"):
        api.run("superres", Image.new("RGB", (8, 8)), model=str(superres_model), tile=64, overlap=64, registry=registry)


def test_progress_counts_steps_over_all_tiles(superres_model: Path, registry) -> None:
    seen = []
    api.run(
        "superres",
        textured(60, 44),
        model=str(superres_model),
        scale="2",
        tile=48,
        overlap=16,
        steps=2,
        registry=registry,
        dtype="fp32",
        progress=lambda s, n, p: seen.append((s, n)),
    )
    tiles = len(tile_spans(44, 24, 8)) * len(tile_spans(60, 24, 8))  # in input pixels: 48 / 2, 16 / 2
    assert tiles == 12
    assert seen[-1][0] == seen[-1][1] == 2 * tiles and [s for s, _ in seen] == list(range(1, 2 * tiles + 1))


def test_out_of_memory_retries_with_smaller_tiles(superres_model: Path, registry, monkeypatch) -> None:
    import torch

    from difftool.plugins.builtin import pixel_model

    real = pixel_model.denoise
    sizes = []

    def tight(model, denoiser, *, cond, **kwargs):
        sizes.append(max(cond.shape[-2:]))
        if max(cond.shape[-2:]) > 80:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, denoiser, cond=cond, **kwargs)

    monkeypatch.setattr(pixel_model, "denoise", tight)
    result = api.run(
        "superres",
        textured(60, 44),
        model=str(superres_model),
        scale="2",
        tile=256,
        overlap=16,
        registry=registry,
        dtype="fp32",
    )
    assert result.image.size == (120, 88) and result.record["tile_used"] == 64
    assert max(sizes[-1:]) <= 80


def test_out_of_memory_at_the_smallest_tile_names_it(superres_model: Path, registry, monkeypatch) -> None:
    from difftool.core.errors import DifftoolError
    from difftool.plugins.builtin import pixel_model

    def never(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes")

    monkeypatch.setattr(pixel_model, "denoise", never)
    with pytest.raises(DifftoolError, match="out of memory even with 64 px tiles"):
        api.run("superres", textured(60, 44), model=str(superres_model), scale="2", tile=256, registry=registry)


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (7, 1), (3, 2)])
def test_tiny_and_odd_sizes(superres_model: Path, inpaint_model: Path, registry, size) -> None:
    image = Image.new("RGB", size, (10, 20, 30))
    assert api.run("superres", image, model=str(superres_model), scale="4", registry=registry).image.size == (
        size[0] * 4,
        size[1] * 4,
    )
    filled = api.run("inpaint", image, mask=Image.new("L", size, 255), model=str(inpaint_model), registry=registry)
    assert filled.image.size == size


@pytest.fixture
def two_embedded(superres_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An install whose embedded models are the clean ``superres`` and the real-world ``superres-real``."""
    import shutil

    from difftool.plugins.builtin import pixel_model

    root = tmp_path / "embedded"
    shutil.copytree(superres_model, root / "superres")
    shutil.copytree(superres_model, root / "superres-real")
    monkeypatch.setattr(pixel_model, "EMBEDDED_ROOT", root)
    return root


def test_the_default_model_is_chosen_per_input(two_embedded: Path, registry, tmp_path: Path) -> None:
    """Issue 33: a JPEG, or a PNG made from one, goes to the real-world model; a clean PNG to the clean one;
    ``--model`` forces either; the choice and its reason are in the record."""
    photo = textured(64, 48)
    photo.save(tmp_path / "clean.png")
    photo.save(tmp_path / "photo.jpg", quality=72)
    photo.save(tmp_path / "blocky.jpg", quality=40)
    Image.open(tmp_path / "blocky.jpg").save(tmp_path / "from-jpeg.png")
    expected = {
        ("clean.png", None): "difftool (input shows no JPEG compression)",
        ("photo.jpg", None): "difftool-real (input is JPEG, quality about 72)",
        ("from-jpeg.png", None): "difftool-real (input shows JPEG's 8x8 blocks",
        ("photo.jpg", "difftool"): "difftool (asked for)",
        ("clean.png", "difftool-real"): "difftool-real (asked for)",
    }
    for (name, model), reason in expected.items():
        result = api.run("superres", tmp_path / name, model=model, scale=2, seed=1, dtype="fp32", registry=registry)
        assert result.record["model_choice"].startswith(reason), (name, model, result.record["model_choice"])
    # A real-world model without the scale asked for: the clean one runs, and says why.
    meta_file = two_embedded / "superres-real" / "difftool.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "scales": [2]}))
    result = api.run("superres", tmp_path / "photo.jpg", scale=4, seed=1, dtype="fp32", registry=registry)
    assert result.record["model_choice"].endswith("but the real-world model has no 4x variant)")
    assert result.image.size == (256, 192)


def test_without_a_real_world_model_the_embedded_one_runs_as_before(two_embedded: Path, registry, tmp_path) -> None:
    import shutil

    shutil.rmtree(two_embedded / "superres-real")
    photo = textured(32, 24)
    photo.save(tmp_path / "photo.jpg", quality=60)
    result = api.run("superres", tmp_path / "photo.jpg", scale=2, seed=1, dtype="fp32", registry=registry)
    assert "model_choice" not in result.record
    assert result.image.size == (64, 48)


def test_jpeg_quality_and_blockiness_are_measured() -> None:
    import io

    from difftool.core.images import open_image
    from difftool.plugins.builtin.jpeg_evidence import BLOCKY, blockiness

    photo = textured(96, 96)
    for quality in (20, 55, 72, 90, 100):
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=quality)
        assert open_image(buffer.getvalue()).info["jpeg_quality"] == quality
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=30)
    blocky = np.asarray(Image.open(buffer), dtype=np.float32) / 255
    clean = np.asarray(photo, dtype=np.float32) / 255
    assert blockiness(clean) < BLOCKY < blockiness(blocky)
