"""Mask helpers shared by the pixel and Stable Diffusion inpainting paths: read, grow, feather, crop, pre-fill."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from difftool.core.errors import ParameterError
from difftool.core.images import LoadedImage


def push_pull_fill(x: Any, known: Any, smoothing: int = 8) -> Any:
    """Fill the unknown pixels of ``x`` (1 x C x H x W) from the known ones (``known`` = 1).

    Pull: average the known pixels down a pyramid; push: upsample the coarse fill back into the
    holes, smoothing each level. Written here because neither Pillow nor torch has hole filling and
    OpenCV is only a benchmark dependency.
    """
    import torch.nn.functional as F

    height, width = x.shape[-2:]
    if bool((known > 0).all()) or min(height, width) <= 1:
        return x
    pooled = F.avg_pool2d(x * known, 2, ceil_mode=True)
    weight = F.avg_pool2d(known, 2, ceil_mode=True)
    coarse = push_pull_fill(pooled / weight.clamp_min(1e-6), (weight > 0).float(), smoothing)
    filled = known * x + (1 - known) * F.interpolate(coarse, size=(height, width), mode="bilinear")
    for _ in range(smoothing):
        blurred = F.avg_pool2d(F.pad(filled, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        filled = known * x + (1 - known) * blurred
    return filled


def mask_array(mask: LoadedImage, size: tuple[int, int], resize: bool) -> np.ndarray:
    """The repaint mask as float H x W in {0, 1}: 1 where the mask image is non-zero."""
    values = mask.rgb.max(axis=2)
    if mask.size != size:
        if not resize:
            raise ParameterError(
                f"the mask is {mask.width}x{mask.height} but the image is {size[0]}x{size[1]}",
                "pass a mask of the image's size or add --resize-mask",
            )
        values = np.asarray(Image.fromarray(values, "F").resize(size, Image.Resampling.NEAREST))
    return (values > 0).astype(np.float32)


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow a {0, 1} mask by ``pixels`` (square structuring element)."""
    if pixels <= 0:
        return mask
    import torch
    import torch.nn.functional as F

    grown = F.max_pool2d(torch.from_numpy(mask)[None, None], 2 * pixels + 1, stride=1, padding=pixels)
    return grown[0, 0].numpy()


def feather(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Blend weights: 1 inside the mask, falling linearly to 0 over ``pixels`` outside it."""
    if pixels <= 0:
        return mask
    if not mask.any():  # no pixel to measure from: scipy's transform then answers 1 everywhere, not infinity
        return np.zeros_like(mask, dtype=np.float32)
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(mask == 0)
    return np.clip(1.0 - distance / (pixels + 1), 0.0, 1.0).astype(np.float32)


def crop_box(region: np.ndarray, margin: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Bounding box of ``region`` grown by ``margin`` and clipped: ``(y0, y1, x0, x1)``."""
    ys, xs = np.nonzero(region)
    width, height = size
    return (
        max(0, int(ys.min()) - margin),
        min(height, int(ys.max()) + 1 + margin),
        max(0, int(xs.min()) - margin),
        min(width, int(xs.max()) + 1 + margin),
    )
