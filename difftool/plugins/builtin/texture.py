"""Texture for a smooth fill: copy fine detail into the hole from a nearby known region that matches.

A model trained for accuracy (PSNR) paints the mean of every plausible fill: the right colours and
shapes, no grain. This adds the grain the way exemplar inpainting (PatchMatch, Criminisi) does, but
only the fine detail: the hole is covered with overlapping tiles; each tile takes the detail (the
image minus its blur) of the known tile at the offset whose smooth colours match it best, nearer
offsets preferred. Whole tiles are copied, so the grain is a real piece of the photo, not a repeated
stamp; overlapping tiles are blended and the blend brought back to the detail's own strength. The
structure (colours, shapes) stays the model's.

Written here because no maintained library offers detail transfer onto a given fill (pypatchmatch
fills the whole hole by copying, structure included, and is a C++ build).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Offsets tried per tile: 16 directions at these multiples of the tile size.
RINGS = (1.0, 1.5, 2.25, 3.5, 5.0)
DIRECTIONS = 16


def blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """A box blur of ``radius`` applied twice (close to a Gaussian), replicate-padded; separable
    convolutions, because CPU pooling with long thin kernels is slow."""
    channels, size = x.shape[1], 2 * radius + 1
    row = torch.full((channels, 1, 1, size), 1.0 / size, dtype=x.dtype)
    column = row.transpose(2, 3)
    for _ in range(2):
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), row, groups=channels)
        x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), column, groups=channels)
    return x


def _sums(a: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero row and column in front: any box sum in four lookups."""
    return np.pad(a, ((1, 0), (1, 0))).cumsum(0).cumsum(1)


def transfer_texture(
    fill: torch.Tensor, known: torch.Tensor, amount: float = 1.0, tile: int = 24, radius: int = 2, reach: float = 0.3
) -> torch.Tensor:
    """``fill`` (1 x C x H x W) with fine detail copied into the pixels where ``known`` (1 x 1 x H x W) is 0.

    ``amount`` scales the detail (0: ``fill`` unchanged); ``radius``: detail is what a blur of this
    radius removes; ``reach`` weighs distance against likeness (larger: nearer sources). Known pixels
    are returned unchanged. The result is a function of the inputs alone (no randomness).
    """
    if amount <= 0 or bool(known.bool().all()):
        return fill
    height, width = fill.shape[-2:]
    if min(height, width) < tile:
        return fill
    x, k = fill.float(), known.float()
    detail = (x - blur(x, radius))[0].numpy()
    smooth = blur(x, max(2, tile // 6))[0].numpy()
    # A source pixel's detail is clean when its blur saw only known pixels.
    clean = (-F.max_pool2d(-k, 4 * radius + 3, stride=1, padding=2 * radius + 1))[0, 0].numpy() > 0.5
    bad = _sums((~clean).astype(np.float64))
    hole = _sums((k[0, 0].numpy() < 0.5).astype(np.float64))

    def box(table: np.ndarray, y: np.ndarray | int, x0: np.ndarray | int) -> np.ndarray:
        return table[y + tile, x0 + tile] - table[y, x0 + tile] - table[y + tile, x0] + table[y, x0]

    # Edges copied whole would show as ghosts of other objects: the grain is soft-clipped at a few
    # times its typical strength around the hole.
    typical = float(np.sqrt(np.mean(detail[:, clean] ** 2))) if clean.any() else 0.0
    if typical > 0:
        detail = 2.5 * typical * np.tanh(detail / (2.5 * typical))
    tent = np.bartlett(tile + 2)[1:-1]
    window = np.outer(tent, tent)
    grain = np.zeros_like(detail)
    weights = np.zeros((height, width))
    wanted = np.zeros((height, width))
    angles = np.arange(DIRECTIONS) * 2 * np.pi / DIRECTIONS
    dys = np.array([round(r * tile * np.sin(a)) for r in RINGS for a in angles])
    dxs = np.array([round(r * tile * np.cos(a)) for r in RINGS for a in angles])
    penalty = reach * 0.1 * (dys**2 + dxs**2) / tile**2
    # Tiles are compared on the smooth image sampled every 4 px: it is smooth, and 16x cheaper.
    windows = np.lib.stride_tricks.sliding_window_view(smooth, (tile, tile), axis=(1, 2))[..., ::4, ::4]
    scale = float(smooth.var()) + 1e-8
    stride = tile * 2 // 3
    for y in sorted({*range(0, height - tile, stride), height - tile}):
        for x0 in sorted({*range(0, width - tile, stride), width - tile}):
            if box(hole, y, x0) == 0:
                continue
            sy, sx = y + dys, x0 + dxs
            inside = (sy >= 0) & (sy <= height - tile) & (sx >= 0) & (sx <= width - tile)
            sy, sx, cost = sy[inside], sx[inside], penalty[inside]
            usable = box(bad, sy, sx) == 0
            if not usable.any():
                continue
            sy, sx, cost = sy[usable], sx[usable], cost[usable]
            likeness = ((windows[:, sy, sx] - windows[:, y, x0][:, None]) ** 2).mean(axis=(0, 2, 3)) / scale
            best = int(np.argmin(likeness + cost))
            piece = detail[:, sy[best] : sy[best] + tile, sx[best] : sx[best] + tile]
            grain[:, y : y + tile, x0 : x0 + tile] += piece * window
            weights[y : y + tile, x0 : x0 + tile] += window
            wanted[y : y + tile, x0 : x0 + tile] += window * float(np.mean(piece**2))
    if not weights.any():
        return fill
    covered = np.maximum(weights, 1e-8)
    blended = torch.from_numpy(grain / covered)[None].float()
    # Blending overlapping tiles of unrelated detail averages their grain away: bring the blend back to
    # the strength of the tiles it came from.
    have = blur(blended.square().mean(1, keepdim=True), radius + 1)
    strength = torch.from_numpy(wanted / covered)[None, None].float()
    blended = blended * (strength / have.clamp_min(1e-10)).sqrt().clamp(max=4.0)
    return fill + amount * blended.to(fill.dtype) * (1 - known)
