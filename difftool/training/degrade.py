"""Degradations that make training pairs: low-resolution inputs for superres, holes for inpaint.

Superres: with probability ``clean_fraction`` (training config) a clean bicubic downscale (what the
benchmark measures); otherwise a Gaussian blur of radius 0.2-1.2 px before the downscale, Gaussian noise
of sigma 0-3/255 and, half of the time, JPEG at quality 60-95. Inpaint: a union of random strokes,
thin scratches, boxes, blobs and object-shaped polygons covering 5-50% of the crop.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _to_u8(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


def downscale(rgb: np.ndarray, scale: int) -> np.ndarray:
    """Clean bicubic downscale by ``scale`` (Pillow's, with antialiasing), float in and out."""
    height, width = rgb.shape[:2]
    channels = [
        np.asarray(
            Image.fromarray(rgb[..., c], "F").resize((width // scale, height // scale), Image.Resampling.BICUBIC)
        )
        for c in range(3)
    ]
    return np.stack(channels, axis=2).clip(0, 1).astype(np.float32)


def degrade_for_superres(
    hr: np.ndarray, scale: int, rng: np.random.Generator, clean_fraction: float = 0.5
) -> np.ndarray:
    """The low-resolution training input for the high-resolution crop ``hr``."""
    if rng.random() < clean_fraction:
        return downscale(hr, scale)
    image = _to_u8(hr).filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.2, 1.2))))
    low = downscale(np.asarray(image, dtype=np.float32) / 255.0, scale)
    low = low + rng.normal(0.0, rng.uniform(0, 3 / 255), size=low.shape).astype(np.float32)
    if rng.random() < 0.5:
        buffer = io.BytesIO()
        _to_u8(low).save(buffer, "JPEG", quality=int(rng.integers(60, 96)))
        low = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0
    return np.clip(low, 0, 1).astype(np.float32)


def random_mask(size: int, rng: np.random.Generator, min_area: float = 0.05, max_area: float = 0.5) -> np.ndarray:
    """A ``size`` x ``size`` float mask (1 = repaint) of strokes, boxes and blobs, 5-50% of the area."""
    target = rng.uniform(min_area, max_area)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(40):
        kind = rng.integers(0, 5)
        if kind == 3:  # thin scratch
            points = [tuple(rng.integers(0, size, 2).tolist()) for _ in range(int(rng.integers(2, 4)))]
            draw.line(points, fill=255, width=int(rng.integers(1, 4)))
        elif kind == 4:  # object-shaped: a polygon around a centre
            r, (x, y) = rng.uniform(size / 10, size / 3), rng.integers(0, size, 2)
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 10))))
            radii = r * rng.uniform(0.5, 1.0, len(angles))
            corners = zip(x + radii * np.cos(angles), y + radii * np.sin(angles), strict=True)
            draw.polygon([(float(px), float(py)) for px, py in corners], fill=255)
        elif kind == 0:  # stroke
            points = [tuple(rng.integers(0, size, 2).tolist()) for _ in range(int(rng.integers(2, 6)))]
            draw.line(points, fill=255, width=int(rng.integers(max(2, size // 32), max(3, size // 6))))
        elif kind == 1:  # box
            w, h = rng.integers(size // 10, size // 2, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            draw.rectangle([int(x), int(y), int(x + w), int(y + h)], fill=255)
        else:  # blob
            r = int(rng.integers(size // 16, size // 5))
            x, y = rng.integers(0, size, 2)
            draw.ellipse([int(x - r), int(y - r), int(x + r), int(y + r)], fill=255)
        if np.asarray(mask).mean() / 255 >= target:
            break
    array = (np.asarray(mask) > 127).astype(np.float32)
    if array.mean() > max_area:  # trim an overshoot by clearing rows from the bottom
        rows = np.cumsum(array.sum(axis=1)) / array.size
        array[np.searchsorted(rows, max_area) :] = 0
    return array
