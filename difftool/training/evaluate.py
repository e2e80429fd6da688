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

    from difftool.app import api
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


#: The low-resolution inputs the real-world superres model is judged on (issue 33): each held-out photo
#: downscaled with Pillow's bicubic filter, then as named. JPEG is Pillow's encoder with 4:2:0 chroma.
INPUT_KINDS = ("clean", "jpeg50", "jpeg70", "jpeg90", "noise5", "blur+jpeg70")


def degraded_input(low: Image.Image, kind: str, seed: int = 0) -> bytes:
    """``low`` degraded as ``kind`` (:data:`INPUT_KINDS`), as the file a user would have (PNG or JPEG bytes)."""
    import io

    from PIL import ImageFilter

    image = low
    if kind == "noise5":
        rng = np.random.default_rng(seed)
        noisy = np.asarray(image, dtype=np.float64) + rng.normal(0, 5.0, (image.height, image.width, 3))
        image = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
    if kind.startswith("blur"):
        image = image.filter(ImageFilter.GaussianBlur(radius=0.8))
    buffer = io.BytesIO()
    if "jpeg" in kind:
        image.save(buffer, "JPEG", quality=int(kind.rsplit("jpeg", 1)[1]), subsampling=2)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def evaluate_superres_inputs(
    models: dict[str, str | None],
    kinds: tuple[str, ...] = INPUT_KINDS,
    scales: tuple[int, ...] = (2, 4),
    limit: int | None = None,
    dtype: str = "fp32",
) -> list[dict[str, Any]]:
    """One row per held-out photo, scale and input kind: Lanczos and each of ``models`` (label -> ``--model``,
    ``None``: the default choice) scored against the clean photo (PSNR, SSIM, and the output's blockiness)."""
    import io

    from difftool.app import api
    from difftool.plugins.builtin.jpeg_evidence import blockiness

    rows = []
    for name, image in holdout_images(limit):
        for scale in scales:
            width, height = image.width // scale * scale, image.height // scale * scale
            hr = image.crop((0, 0, width, height))
            clean_low = hr.resize((width // scale, height // scale), Image.Resampling.BICUBIC)
            for kind in kinds:
                data = degraded_input(clean_low, kind)
                low = Image.open(io.BytesIO(data)).convert("RGB")
                outputs = {"lanczos": low.resize((width, height), Image.Resampling.LANCZOS)}
                row: dict[str, Any] = {"image": name, "scale": scale, "input": kind}
                for label, model in models.items():
                    result = api.run("superres", data, model=model, scale=str(scale), seed=0, dtype=dtype)
                    outputs[label] = result.image
                    row[f"{label}_choice"] = result.record.get("model_choice", model or "default")
                for label, restored in outputs.items():
                    scores = superres_scores(hr, restored, scale)
                    row[f"{label}_psnr"], row[f"{label}_ssim"] = round(scores["psnr"], 4), round(scores["ssim"], 4)
                    pixels = np.asarray(restored, dtype=np.float32) / 255
                    row[f"{label}_blockiness"] = round(blockiness(pixels, period=8 * scale), 4)
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


def object_mask(size: tuple[int, int], seed: int) -> np.ndarray:
    """A fixed object-sized region: a star-shaped polygon over about 6-10% of the image, off the border."""
    rng = np.random.default_rng(1000 + seed)
    width, height = size
    radius = float(np.sqrt(rng.uniform(0.06, 0.10) * width * height / np.pi))
    cx = rng.uniform(radius * 1.2, width - radius * 1.2)
    cy = rng.uniform(radius * 1.2, height - radius * 1.2)
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False) + rng.uniform(0, 0.5)
    radii = radius * rng.uniform(0.75, 1.15, len(angles))
    mask = Image.new("L", size, 0)
    points = [(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for a, r in zip(angles, radii, strict=True)]
    ImageDraw.Draw(mask).polygon(points, fill=255)
    return np.asarray(mask) > 0


def inpaint_masks(size: tuple[int, int], index: int) -> dict[str, np.ndarray]:
    """The benchmark's two fixed masks for held-out image ``index``: strokes and boxes; one object."""
    return {"strokes": benchmark_masks(size, index), "object": object_mask(size, index)}


def erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    from PIL import ImageFilter

    image = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * pixels + 1))
    return np.asarray(image) > 0


def gradient_energy(rgb: np.ndarray, where: np.ndarray) -> float:
    """Mean squared forward difference (x and y, all channels) at the pixels in ``where``."""
    x = rgb.astype(np.float64)
    dx = np.zeros_like(x)
    dy = np.zeros_like(x)
    dx[:, :-1] = x[:, 1:] - x[:, :-1]
    dy[:-1] = x[1:] - x[:-1]
    return float((dx[where] ** 2 + dy[where] ** 2).mean())


def texture_ratio(truth: np.ndarray, fill: np.ndarray, mask: np.ndarray) -> float:
    """The fill's gradient energy over the photo's, inside the mask (1.0: as much detail; a smear: far
    below). The mask is eroded by 2 px first so the seam at its edge does not count."""
    inner = erode(mask, 2)
    if not inner.any():
        inner = mask
    return gradient_energy(fill, inner) / max(gradient_energy(truth, inner), 1e-9)


def histogram_distance(truth: np.ndarray, fill: np.ndarray, mask: np.ndarray, bins: int = 8) -> float:
    """Total variation distance between the colour histograms (``bins``³) inside the mask: 0 = same colours."""

    def histogram(rgb: np.ndarray) -> np.ndarray:
        index = (rgb[mask].astype(np.int64) * bins // 256) @ np.array([bins * bins, bins, 1])
        counts = np.bincount(index, minlength=bins**3).astype(np.float64)
        return counts / counts.sum()

    return float(0.5 * np.abs(histogram(truth) - histogram(fill)).sum())


def classical_fills(holed: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The classical anchors that are installed: OpenCV's Telea and Navier-Stokes, PatchMatch.

    opencv-python-headless and pypatchmatch (InvokeAI's infill, patch size 3 as it uses) are
    benchmark-only dependencies.
    """
    fills: dict[str, np.ndarray] = {}
    mask_u8 = mask.astype(np.uint8) * 255
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        bgr = np.ascontiguousarray(holed[..., ::-1])
        fills["telea"] = cv2.inpaint(bgr, mask_u8, 3, cv2.INPAINT_TELEA)[..., ::-1]
        fills["ns"] = cv2.inpaint(bgr, mask_u8, 3, cv2.INPAINT_NS)[..., ::-1]
    try:
        from patchmatch import patch_match
    except ImportError:
        patch_match = None
    if patch_match is not None and patch_match.patchmatch_available:
        fills["patchmatch"] = patch_match.inpaint(np.ascontiguousarray(holed), mask_u8, patch_size=3)
    return fills


def inpaint_scores(truth: np.ndarray, fill: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """PSNR inside the mask, SSIM over its bounding box, texture ratio and colour histogram distance."""
    ys, xs = np.nonzero(mask)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    return {
        "psnr": psnr(truth[mask], fill[mask]),
        # Over the masks' bounding box, where only the masked pixels differ from the truth.
        "ssim": ssim(truth[box], fill[box]),
        "texture": texture_ratio(truth, fill, mask),
        "hist": histogram_distance(truth, fill, mask),
    }


def evaluate_inpaint(
    models: dict[str, tuple[str | Path, dict[str, Any]]] | str | Path,
    dtype: str = "auto",
    limit: int | None = None,
    crop: int | None = None,
    classical: bool = True,
) -> list[dict[str, Any]]:
    """One row per held-out image and mask set: each model's scores (``models``: label -> (path, extra
    run parameters), or one model path) and the classical anchors' (``classical``), inside the mask."""
    from difftool.app import api

    if not isinstance(models, dict):
        models = {"model": (models, {})}
    rows = []
    for index, (name, image) in enumerate(holdout_images(limit)):
        if crop:
            left, top = (image.width - crop) // 2, (image.height - crop) // 2
            image = image.crop((left, top, left + crop, top + crop))
        for masks_name, mask in inpaint_masks(image.size, index).items():
            truth = np.asarray(image)
            holed = truth.copy()
            holed[mask] = 0
            mask_image = Image.fromarray((mask * 255).astype(np.uint8))
            fills = {}
            for label, (path, extra) in models.items():
                result = api.run(
                    "inpaint", Image.fromarray(holed), model=str(path), mask=mask_image, seed=0, dtype=dtype, **extra
                )
                fills[label] = np.asarray(result.image)
            if classical:
                fills.update(classical_fills(holed, mask))
            row: dict[str, Any] = {"image": name, "masks": masks_name, "mask_fraction": round(float(mask.mean()), 4)}
            for method, fill in fills.items():
                for key, value in inpaint_scores(truth, fill, mask).items():
                    row[f"{method}_{key}"] = round(value, 4)
            rows.append(row)
    return rows


def evaluate(model: str | Path, task: str, limit: int | None = None, dtype: str = "auto") -> list[dict[str, Any]]:
    if task == "superres":
        return evaluate_superres(model, limit=limit, dtype=dtype)
    return evaluate_inpaint(model, limit=limit, dtype=dtype)
