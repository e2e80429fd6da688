"""Built-in ControlNet preprocessors: the ones that need no weights, registered like a plugin's.

Each takes an H x W x 3 float32 image in [0, 1] (and the inpaint task's mask) and returns the control
image. OpenCV is not a dependency: Canny is written here with numpy and scipy (OpenCV's algorithm:
3x3 Sobel, L1 gradient magnitude, non-maximum suppression, hysteresis between two thresholds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from difftool.core.errors import ParameterError
from difftool.core.task import Param
from difftool.plugins.hookspecs import hookimpl


def _luminance(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma in 0..255, as OpenCV's RGB2GRAY (A1111's preprocessors work on 8-bit values)."""
    return (image[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)) * 255.0


def _gray3(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(values, 0.0, 1.0)[..., None], 3, axis=-1).astype(np.float32)


def none(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The image is the control image (a ready edge map, depth map, pose)."""
    return image


def invert(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Black lines on white -> white on black, as line-art and scribble ControlNets expect."""
    return (1.0 - image).astype(np.float32)


def canny(image: np.ndarray, mask: np.ndarray | None, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """White one-pixel edges on black; thresholds on the 0..255 gradient scale, as OpenCV's and A1111's."""
    from scipy import ndimage

    if low > high:
        raise ParameterError(f"canny low threshold {low:g} is above high {high:g}", "pass low <= high")
    gray = _luminance(image)
    gx = ndimage.sobel(gray, axis=1, mode="nearest")
    gy = ndimage.sobel(gray, axis=0, mode="nearest")
    magnitude = np.abs(gx) + np.abs(gy)
    # Non-maximum suppression along the gradient direction, quantised to 0/45/90/135 degrees.
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    padded = np.pad(magnitude, 1)
    height, width = magnitude.shape

    def shifted(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    keep = np.zeros(magnitude.shape, bool)
    for lo, hi, (dy, dx) in ((0, 22.5, (0, 1)), (157.5, 180.1, (0, 1)), (22.5, 67.5, (1, 1)), (67.5, 112.5, (1, 0)),
                             (112.5, 157.5, (1, -1))):  # fmt: skip
        sector = (angle >= lo) & (angle < hi)
        peak = (magnitude >= shifted(dy, dx)) & (magnitude > shifted(-dy, -dx))
        keep |= sector & peak
    thin = np.where(keep, magnitude, 0.0)
    strong, weak = thin > high, thin > low
    # Hysteresis: a weak edge survives when its 8-connected component holds a strong one.
    labels, count = ndimage.label(weak, structure=np.ones((3, 3)))
    if count == 0:
        return _gray3(np.zeros(gray.shape, np.float32))
    alive = np.zeros(count + 1, bool)
    alive[np.unique(labels[strong])] = True
    alive[0] = False
    return _gray3(alive[labels].astype(np.float32))


def scribble(image: np.ndarray, mask: np.ndarray | None, threshold: float = 127.0) -> np.ndarray:
    """A drawing made binary, its lines white on black whichever way it was drawn (the minority is lines)."""
    binary = _luminance(image) > threshold
    if binary.mean() > 0.5:  # dark lines on a light page
        binary = ~binary
    return _gray3(binary.astype(np.float32))


def threshold(image: np.ndarray, mask: np.ndarray | None, threshold: float = 127.0) -> np.ndarray:
    """White where the image is brighter than ``threshold`` (0..255), black elsewhere."""
    return _gray3((_luminance(image) > threshold).astype(np.float32))


def lineart(image: np.ndarray, mask: np.ndarray | None, sigma: float = 6.0) -> np.ndarray:
    """Lines from a difference of Gaussians, white on black (A1111's ``lineart_standard``)."""
    from scipy import ndimage

    pixels = image[..., :3].astype(np.float32) * 255.0
    blurred = ndimage.gaussian_filter(pixels, sigma=(sigma, sigma, 0))
    intensity = np.min(blurred - pixels, axis=2).clip(0, 255)
    lines = intensity[intensity > 8]
    intensity = intensity / max(16.0, float(np.median(lines)) if lines.size else 16.0)
    return _gray3(intensity * 127.0 / 255.0)


def tile(image: np.ndarray, mask: np.ndarray | None, down: float = 1.0) -> np.ndarray:
    """The image itself, optionally down-sampled by ``down`` first (A1111's ``tile_resample``)."""
    from PIL import Image

    if down <= 1.0:
        return image
    height, width = image.shape[:2]
    small = (max(1, round(width / down)), max(1, round(height / down)))
    pil = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    return np.asarray(pil.resize(small, Image.Resampling.LANCZOS), np.float32) / 255.0


def blur(image: np.ndarray, mask: np.ndarray | None, sigma: float = 9.0) -> np.ndarray:
    """A Gaussian blur (A1111's ``blur_gaussian``), for tile ControlNets."""
    from scipy import ndimage

    return np.clip(ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0)), 0, 1)


def inpaint(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """A1111's inpaint ControlNet input: the image with the masked pixels set to -1."""
    if mask is None:
        raise ParameterError("the inpaint preprocessor needs a mask", "use it with `difftool run inpaint --mask FILE`")
    out = image.astype(np.float32).copy()
    out[mask > 0.5] = -1.0
    return out


_LEVEL = {"min": 0.0, "max": 255.0}
BUILTIN: tuple[tuple[str, Callable[..., np.ndarray], str, tuple[Param, ...]], ...] = (
    ("none", none, "the image is the control image", ()),
    ("invert", invert, "black on white -> white on black", ()),
    (
        "canny",
        canny,
        "Canny edges",
        (
            Param("low", "float", default=100.0, help="lower gradient threshold (0..255 scale)", **_LEVEL),
            Param("high", "float", default=200.0, help="upper gradient threshold", **_LEVEL),
        ),
    ),
    ("scribble", scribble, "a drawing made binary", (Param("threshold", "float", default=127.0, **_LEVEL),)),
    ("threshold", threshold, "white above a brightness", (Param("threshold", "float", default=127.0, **_LEVEL),)),
    ("lineart", lineart, "lines by edges", (Param("sigma", "float", default=6.0, min=0.5, max=50.0),)),
    ("tile", tile, "the image, optionally down-sampled", (Param("down", "float", default=1.0, min=1.0, max=8.0),)),
    ("blur", blur, "Gaussian blur", (Param("sigma", "float", default=9.0, min=0.0, max=64.0),)),
    ("inpaint", inpaint, "masked pixels set to -1 (inpaint task)", ()),
)


@hookimpl
def register_preprocessors(register: Callable[..., Any]) -> None:
    for name, function, summary, options in BUILTIN:
        register(name, function, summary=summary, options=options)
