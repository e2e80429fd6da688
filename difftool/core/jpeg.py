"""A JPEG's quality, estimated from the quantization tables it carries (what ``identify -verbose`` reports)."""

from __future__ import annotations

from typing import Any

import numpy as np

#: The IJG (libjpeg) luminance quantization table at quality 50, row by row (Pillow reports tables so).
_IJG_LUMA = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    dtype=np.float64,
)  # fmt: skip


def jpeg_quality(quantization: Any) -> int | None:
    """The IJG quality (1-100) whose luminance table is closest to a JPEG's own (Pillow's ``quantization``),
    the estimate tools like ImageMagick's ``identify`` give; ``None`` without a usable table."""
    try:
        table = np.asarray(list(quantization[0]), dtype=np.float64)
    except (TypeError, KeyError, IndexError, ValueError):
        return None
    if table.shape != (64,):
        return None
    best, best_error = None, float("inf")
    for quality in range(1, 101):
        scale = 5000 / quality if quality < 50 else 200 - 2 * quality
        expected = np.clip(np.floor((_IJG_LUMA * scale + 50) / 100), 1, 255)
        error = float(np.abs(expected - table).mean())
        if error < best_error:
            best, best_error = quality, error
    return best
