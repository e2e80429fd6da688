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


# --- real-world degradations (the ``difftool-real`` superres models) -------------------------------------
# Written here rather than taken from Real-ESRGAN/BasicSR: those pull in torchvision and OpenCV, which cannot
# load here, and work on GPU batches; these are the same steps (Wang et al. 2021, "Real-ESRGAN", section 3)
# on one float crop with NumPy, SciPy and Pillow's own JPEG encoder (chroma subsampling as phones use).

#: How a real-world training input is made: a clean bicubic downscale; a downscale saved as JPEG (what phones
#: and websites hand users: the commonest input); or the full second-order chain.
REAL_MIX = {"clean": 0.15, "jpeg": 0.50, "second_order": 0.35}
_RESAMPLE = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS, Image.Resampling.BOX)


def blur_kernel(rng: np.random.Generator, sigma: tuple[float, float]) -> np.ndarray:
    """A random isotropic or anisotropic (rotated) Gaussian, or a generalized Gaussian (shape beta 0.5-4)."""
    size = int(rng.choice([7, 9, 11, 13, 15]))
    sx = rng.uniform(*sigma)
    sy = sx if rng.random() < 0.5 else rng.uniform(*sigma)
    theta = rng.uniform(0, np.pi)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    inverse = np.linalg.inv(rotation @ np.diag([sx**2, sy**2]) @ rotation.T)
    axis = np.arange(size) - size // 2
    grid = np.stack(np.meshgrid(axis, axis), axis=-1)
    distance = np.einsum("...i,ij,...j->...", grid, inverse, grid)
    beta = 1.0 if rng.random() < 0.6 else rng.uniform(0.5, 4.0)
    kernel = np.exp(-0.5 * np.power(distance, beta))
    return (kernel / kernel.sum()).astype(np.float32)


def _blur(rgb: np.ndarray, rng: np.random.Generator, sigma: tuple[float, float]) -> np.ndarray:
    from scipy import ndimage

    kernel = blur_kernel(rng, sigma)
    return np.stack([ndimage.convolve(rgb[..., c], kernel, mode="reflect") for c in range(3)], axis=2)


def _resize(rgb: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    resample = _RESAMPLE[int(rng.integers(0, len(_RESAMPLE)))]
    channels = [np.asarray(Image.fromarray(rgb[..., c], "F").resize(size, resample)) for c in range(3)]
    return np.stack(channels, axis=2).clip(0, 1).astype(np.float32)


def _noise(rgb: np.ndarray, rng: np.random.Generator, gaussian: tuple[float, float], poisson: tuple[float, float]):
    gray = rng.random() < 0.4
    if rng.random() < 0.5:
        shape = rgb.shape[:2] + (1,) if gray else rgb.shape
        noise = rng.normal(0.0, rng.uniform(*gaussian) / 255, size=shape)
    else:  # shot noise: brighter pixels get more
        values = 255.0 / rng.uniform(*poisson)
        base = rgb.mean(axis=2, keepdims=True) if gray else rgb
        noise = rng.poisson(np.clip(base, 0, 1) * values) / values - base
    return np.clip(rgb + noise, 0, 1).astype(np.float32)


def jpeg(rgb: np.ndarray, quality: int, subsampling: int = 2) -> np.ndarray:
    """``rgb`` through Pillow's JPEG encoder (``subsampling`` 0: 4:4:4, 1: 4:2:2, 2: 4:2:0) and back."""
    buffer = io.BytesIO()
    _to_u8(rgb).save(buffer, "JPEG", quality=int(quality), subsampling=int(subsampling))
    return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0


def _random_jpeg(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return jpeg(rgb, int(rng.integers(30, 96)), int(rng.choice([0, 1, 2], p=[0.25, 0.15, 0.6])))


def check_mix(mix: dict[str, float]) -> dict[str, float]:
    """``mix`` if it gives a share of each kind of :data:`REAL_MIX`, the shares adding up to 1."""
    if set(mix) != set(REAL_MIX) or min(mix.values()) < 0 or abs(sum(mix.values()) - 1) > 1e-6:
        raise ValueError(f"real_mix {mix}: give shares of {', '.join(REAL_MIX)} that add up to 1")
    return mix


def degrade_real(
    hr: np.ndarray, scale: int, rng: np.random.Generator, mix: dict[str, float] | None = None
) -> np.ndarray:
    """A real-world low-resolution input for ``hr`` (see :data:`REAL_MIX`): blur (isotropic, anisotropic,
    generalized Gaussian), a resize with a random kernel, Gaussian or Poisson noise and JPEG at quality 30-95,
    twice, the second time in random order; the clean and the plain-JPEG cases kept in the mix."""
    height, width = hr.shape[:2]
    size = (width // scale, height // scale)
    mix = check_mix(mix or REAL_MIX)
    kind = rng.choice(list(REAL_MIX), p=[mix[k] for k in REAL_MIX])
    if kind == "clean":
        return downscale(hr, scale)
    if kind == "jpeg":
        return _random_jpeg(downscale(hr, scale), rng)
    image = hr
    if rng.random() < 0.8:
        image = _blur(image, rng, (0.2, 2.0))
    factor = rng.uniform(0.5, 1.2) / scale**0.5  # part of the way down, by a random kernel
    middle = (max(8, round(width * factor)), max(8, round(height * factor)))
    image = _resize(image, middle, rng)
    if rng.random() < 0.7:
        image = _noise(image, rng, (1, 15), (0.05, 2.0))
    if rng.random() < 0.8:
        image = _random_jpeg(image, rng)
    if rng.random() < 0.5:
        image = _blur(image, rng, (0.2, 1.2))
    if rng.random() < 0.5:
        image = _noise(image, rng, (1, 8), (0.05, 1.0))
    if rng.random() < 0.5:  # last: a resize to the output's size, then JPEG; or the other way round
        image = _random_jpeg(_resize(image, size, rng), rng)
    else:
        image = _resize(_random_jpeg(image, rng), size, rng)
    return np.clip(image, 0, 1).astype(np.float32)
