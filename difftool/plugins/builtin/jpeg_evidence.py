"""Whether an input has been through JPEG: what picks the real-world superres model by default (issue 33).

A JPEG file says so itself (its format, and its quantization tables give its quality, see
:func:`difftool.core.images.jpeg_quality`). A PNG or WebP made from a JPEG does not: its 8x8 blocks do.
:func:`blockiness` compares the luminance steps across the 8-pixel grid with the steps beside it: about 1 for
a photo that never saw JPEG, clearly above 1 once blocks were quantised.
"""

from __future__ import annotations

import numpy as np

from difftool.core.images import LoadedImage

#: :func:`blockiness` above this: the picture shows JPEG's 8x8 grid. Measured on training photos (never the
#: held-out ones) downscaled 2x: clean 0.94-1.04; saved at JPEG quality 60: 1.08-2.2, at 80: 0.98-1.65.
BLOCKY = 1.10
#: Sides shorter than this carry too few blocks to measure.
_MIN_SIDE = 32


def blockiness(rgb: np.ndarray, period: int = 8) -> float:
    """Mean luminance step across the 8x8 grid over the mean step elsewhere (1.0: no grid). ``period``: the
    grid's pitch (16 on a 2x upscale of a JPEG: how much of its blocking an upscaler kept)."""
    y = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    ratios = []
    for steps in (np.abs(np.diff(y, axis=1)), np.abs(np.diff(y, axis=0).T)):
        if steps.shape[1] < max(_MIN_SIDE, 4 * period):
            continue
        on_grid = (np.arange(steps.shape[1]) % period) == period - 1  # between pixels 8k+7 and 8k+8
        across, beside = float(steps[:, on_grid].mean()), float(steps[:, ~on_grid].mean())
        ratios.append(across / beside if beside > 1e-6 else 1.0)
    return float(np.mean(ratios)) if ratios else 1.0


def jpeg_evidence(image: LoadedImage) -> str | None:
    """Why ``image`` looks like it went through JPEG (``"input is JPEG, quality about 72"``), or ``None``."""
    if image.source_format == "JPEG":
        quality = image.info.get("jpeg_quality")
        return f"input is JPEG, quality about {quality}" if quality else "input is JPEG"
    if min(image.size) >= _MIN_SIDE:
        measured = blockiness(image.rgb)
        if measured > BLOCKY:
            return f"input shows JPEG's 8x8 blocks (blockiness {measured:.2f})"
    return None
