"""Overlapping tiles and the weights that blend them without seams (superres, tiled VAE decode)."""

from __future__ import annotations

import torch


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``0..length`` with as few tiles of at most ``tile`` as possible,
    overlapping by at least ``overlap``. Tiles are shrunk to share the length evenly, so the work
    spent on overlaps stays small. One span if the length fits in a tile."""
    if tile >= length:
        return [(0, length)]
    if overlap >= tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    count = -(-(length - overlap) // (tile - overlap))  # ceil
    size = -(-(length + (count - 1) * overlap) // count)  # the even share, overlaps included
    stride = (length - size) / (count - 1)
    return [(start, start + size) for start in sorted({int(round(i * stride)) for i in range(count)})]


def ramp(length: int, left: int, right: int) -> torch.Tensor:
    """1-D weights: rising over ``left`` samples, flat, falling over ``right`` (never exactly zero)."""
    weights = torch.ones(length)
    if left:
        weights[:left] = (torch.arange(left) + 0.5) / left
    if right:
        weights[length - right :] = torch.minimum(weights[length - right :], (torch.arange(right, 0, -1) - 0.5) / right)
    return weights


def blend_weights(
    span_y: tuple[int, int], span_x: tuple[int, int], size: tuple[int, int], overlap: int
) -> torch.Tensor:
    """H x W weights for one tile: ramps on the sides that border another tile, 1 on image edges."""
    (y0, y1), (x0, x1) = span_y, span_x
    height, width = size
    wy = ramp(y1 - y0, overlap if y0 > 0 else 0, overlap if y1 < height else 0)
    wx = ramp(x1 - x0, overlap if x0 > 0 else 0, overlap if x1 < width else 0)
    return wy[:, None] * wx[None, :]
