"""Quality evaluation on the held-out photos: superres against bicubic/Lanczos, inpaint against OpenCV.

Used by ``difftool train`` (final eval), the benchmark script and the model cards. Inputs are made
the way a user's would be: 8-bit images, downscaled with Pillow's bicubic filter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from difftool.training.data import builtin_corpus


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 Y channel (16-235), as SR papers report it."""
    rgb = rgb.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    if a.ndim == 3:
        return float(structural_similarity(a, b, channel_axis=2, data_range=255))
    return float(structural_similarity(a, b, data_range=255))


def holdout_images(limit: int | None = None) -> list[tuple[str, Image.Image]]:
    found = [(c.name, Image.open(c.path).convert("RGB")) for c in builtin_corpus("eval")]
    return found[:limit] if limit else found


def superres_scores(hr: Image.Image, restored: Image.Image, scale: int) -> dict[str, float]:
    """PSNR/SSIM on RGB and Y, with ``scale`` pixels shaved off each border (the usual protocol)."""
    a = np.asarray(hr)[scale:-scale, scale:-scale]
    b = np.asarray(restored)[scale:-scale, scale:-scale]
    return {
        "psnr": psnr(a, b),
        "ssim": ssim(a, b),
        "psnr_y": psnr(luma(a), luma(b)),
        "ssim_y": ssim(luma(a), luma(b)),
    }


def evaluate_superres(
    model: str | Path,
    scales: tuple[int, ...] | None = None,
    dtype: str = "auto",
    crop: int | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """One row per held-out image and scale (default: the scales the model offers): the model's scores
    and bicubic's and Lanczos'."""
    import json

    from difftool import api
    from difftool.plugins.builtin.pixel_model import META_FILE

    if scales is None:  # a one-scale model (an SRNet run) cannot be asked for the other scale
        meta = json.loads((Path(model) / META_FILE).read_text())
        scales = tuple(int(s) for s in meta.get("scales", (2, 4)))

    rows = []
    for name, image in holdout_images(limit):
        if crop:
            left, top = (image.width - crop) // 2, (image.height - crop) // 2
            image = image.crop((left, top, left + crop, top + crop))
        for scale in scales:
            width, height = image.width // scale * scale, image.height // scale * scale
            hr = image.crop((0, 0, width, height))
            low = hr.resize((width // scale, height // scale), Image.Resampling.BICUBIC)
            result = api.run("superres", low, model=str(model), scale=str(scale), seed=0, dtype=dtype).image
            row: dict[str, Any] = {"image": name, "scale": scale}
            for method, restored in (
                ("model", result),
                ("bicubic", low.resize((width, height), Image.Resampling.BICUBIC)),
                ("lanczos", low.resize((width, height), Image.Resampling.LANCZOS)),
            ):
                for key, value in superres_scores(hr, restored, scale).items():
                    row[f"{method}_{key}"] = round(value, 4)
            rows.append(row)
    return rows


def benchmark_masks(size: tuple[int, int], seed: int) -> np.ndarray:
    """A fixed mask per image: three boxes and three strokes, 16-96 px, never touching the border."""
    rng = np.random.default_rng(seed)
    width, height = size
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for side in (16, 48, 96):
        x, y = rng.integers(8, width - side - 8), rng.integers(8, height - side - 8)
        draw.rectangle([int(x), int(y), int(x + side - 1), int(y + side - 1)], fill=255)
    for length, thickness in ((64, 8), (96, 12), (80, 16)):
        x, y = rng.integers(length, width - length), rng.integers(length, height - length)
        angle = rng.uniform(0, np.pi)
        end = (int(x + length * np.cos(angle)), int(y + length * np.sin(angle)))
        draw.line([(int(x), int(y)), end], fill=255, width=thickness)
    return np.asarray(mask) > 0


def evaluate_inpaint(model: str | Path, dtype: str = "auto", limit: int | None = None) -> list[dict[str, Any]]:
    """PSNR/SSIM inside the mask: the model against OpenCV's Telea and Navier-Stokes (if installed)."""
    from difftool import api

    try:
        import cv2
    except ImportError:  # opencv-python-headless is a benchmark-only dependency
        cv2 = None
    rows = []
    for index, (name, image) in enumerate(holdout_images(limit)):
        mask = benchmark_masks(image.size, seed=index)
        mask_image = Image.fromarray((mask * 255).astype(np.uint8))
        truth = np.asarray(image)
        holed = truth.copy()
        holed[mask] = 0
        outputs = {}
        for method, fill in (("model", "blur"), ("model_noise", "noise")):
            result = api.run(
                "inpaint", Image.fromarray(holed), model=str(model), mask=mask_image, seed=0, dtype=dtype, fill=fill
            )
            outputs[method] = np.asarray(result.image)
        if cv2 is not None:
            mask_u8 = mask.astype(np.uint8) * 255
            bgr = np.ascontiguousarray(holed[..., ::-1])
            outputs["telea"] = cv2.inpaint(bgr, mask_u8, 3, cv2.INPAINT_TELEA)[..., ::-1]
            outputs["ns"] = cv2.inpaint(bgr, mask_u8, 3, cv2.INPAINT_NS)[..., ::-1]
        row: dict[str, Any] = {"image": name, "mask_fraction": round(float(mask.mean()), 4)}
        ys, xs = np.nonzero(mask)
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        for method, output in outputs.items():
            row[f"{method}_psnr"] = round(psnr(truth[mask], output[mask]), 4)
            # SSIM over the masks' bounding box, where only the masked pixels differ from the truth.
            row[f"{method}_ssim"] = round(ssim(truth[box], output[box]), 4)
        rows.append(row)
    return rows


def evaluate(model: str | Path, task: str, limit: int | None = None, dtype: str = "auto") -> list[dict[str, Any]]:
    if task == "superres":
        return evaluate_superres(model, limit=limit, dtype=dtype)
    return evaluate_inpaint(model, limit=limit, dtype=dtype)
