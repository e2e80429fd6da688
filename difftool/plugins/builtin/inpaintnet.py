"""InpaintNet: difftool's inpainting denoiser, built for holes rather than borrowed from a U-Net.

Input channels, in the order the sampler concatenates them: the noisy sample (3), the masked image
(holes set to 0, 3) and the mask (1 = repaint). The network

* fills the hole with a pyramid (push-pull) fill first and predicts only what that smooth fill
  misses, so an untrained network already returns the classical fill;
* works at a quarter of the resolution (pixel-unshuffle, then a strided convolution), where dilated
  residual blocks (dilations 1, 2, 4, 8, ...) reach across a hole of a few hundred pixels;
* is mask-aware at every level: each block sees the mask at its resolution, and a masked global
  average (the known pixels only) gives every block the image's overall statistics;
* is modulated by the timestep (FiLM), so one network serves every step of the few-step sampler;
* returns the known pixels unchanged: outside the mask its output is the input image.

Nothing in it depends on the image size beyond "a multiple of 4", and it uses only operations that
torch.export and ONNX handle with dynamic height and width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class InpaintNetOutput(BaseOutput):
    """``.sample``: the predicted clean image."""

    sample: torch.Tensor


def pyramid_fill(x: torch.Tensor, known: torch.Tensor, levels: int = 7, smoothing: int = 2) -> torch.Tensor:
    """Fill where ``known`` is 0 from the known pixels: a push-pull pyramid of a fixed depth.

    Unlike :func:`~difftool.plugins.builtin.masks.push_pull_fill` (which recurses until the image is
    one pixel), the depth is fixed and nothing branches on the data, so the fill traces into an
    exported graph with dynamic sizes. Below the coarsest level, holes take the known pixels' mean.
    """
    sums, weights = [x * known], [known]
    for _ in range(levels):
        sums.append(F.avg_pool2d(sums[-1], 2, ceil_mode=True))
        weights.append(F.avg_pool2d(weights[-1], 2, ceil_mode=True))
    total = known.sum(dim=(2, 3), keepdim=True)
    filled = (x * known).sum(dim=(2, 3), keepdim=True) / total.clamp_min(1e-6)
    for level_sum, level_weight in zip(reversed(sums), reversed(weights), strict=True):
        coarse = F.interpolate(filled, size=level_sum.shape[-2:], mode="bilinear", align_corners=False)
        have = (level_weight > 1e-6).to(x.dtype)
        own = level_sum / level_weight.clamp_min(1e-6)
        filled = have * own + (1 - have) * coarse
        for _ in range(smoothing):
            blurred = F.avg_pool2d(F.pad(filled, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
            filled = have * own + (1 - have) * blurred
    return filled


class DilatedBlock(nn.Module):
    """conv (dilated, sees the mask) - FiLM(t) - ReLU - conv, added back to the input."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels + 1, channels, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        h = self.conv1(torch.cat([x, mask], dim=1)) * (1 + gamma) + beta
        return x + self.conv2(F.relu(h))


class InpaintNet(ModelMixin, ConfigMixin):
    """``InpaintNet(sample, timestep) -> clean image``; ``sample`` = noisy image + masked image + mask.

    ``sample``: B x 7 x H x W, H and W multiples of 4. ``timestep``: scalar or one per batch item.
    ``class_labels`` is accepted and ignored (the U-Nets' call signature).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 7,
        out_channels: int = 3,
        channels: int = 96,
        fine_channels: int = 48,
        dilations: tuple[int, ...] = (1, 2, 4, 8, 1, 2, 4, 8),
        embed_dim: int = 128,
    ) -> None:
        super().__init__()
        self.time_proj = Timesteps(embed_dim // 2, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(embed_dim // 2, embed_dim)
        self.film = nn.Linear(embed_dim, len(dilations) * 2 * channels)
        nn.init.zeros_(self.film.weight)  # starts as a plain (time-independent) network
        nn.init.zeros_(self.film.bias)
        # Fine level (1/2 resolution): the noisy sample, masked image, mask and pyramid fill.
        self.head = nn.Conv2d((in_channels + out_channels) * 4, fine_channels, 3, padding=1)
        self.down = nn.Conv2d(fine_channels, channels, 3, stride=2, padding=1)
        self.context = nn.Linear(channels, channels)
        self.body = nn.ModuleList(DilatedBlock(channels, d) for d in dilations)
        self.up = nn.Conv2d(channels, fine_channels * 4, 3, padding=1)
        self.fuse = nn.Conv2d(fine_channels * 2 + 4, fine_channels, 3, padding=1)
        self.refine = nn.Conv2d(fine_channels, fine_channels, 3, padding=1)
        self.tail = nn.Conv2d(fine_channels, out_channels * 4, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # starts as the pyramid fill
        nn.init.zeros_(self.tail.bias)

    @property
    def multiple(self) -> int:
        """Height and width must be multiples of this."""
        return 4

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, class_labels: torch.Tensor | None = None
    ) -> InpaintNetOutput:
        batch = sample.shape[0]
        masked, mask = sample[:, 3:6], sample[:, 6:7]
        known = 1 - mask
        fill = pyramid_fill(masked, known)
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        film = self.film(F.silu(emb)).view(batch, len(self.body), 2, -1, 1, 1)

        fine = F.relu(self.head(F.pixel_unshuffle(torch.cat([sample, fill], dim=1), 2)))
        h = F.relu(self.down(fine))
        mask_half = F.avg_pool2d(mask, 2)
        mask_quarter = F.avg_pool2d(mask_half, 2)
        known_quarter = 1 - mask_quarter
        pooled = (h * known_quarter).sum(dim=(2, 3)) / known_quarter.sum(dim=(2, 3)).clamp_min(1e-6)
        h = h + self.context(pooled)[..., None, None]
        for index, block in enumerate(self.body):
            h = block(h, mask_quarter, film[:, index, 0], film[:, index, 1])
        up = F.pixel_shuffle(self.up(h), 2)
        x = F.relu(self.fuse(torch.cat([up, fine, F.pixel_unshuffle(mask, 2)], dim=1)))
        x = x + self.refine(F.relu(x))
        image = fill + F.pixel_shuffle(self.tail(x), 2)
        return InpaintNetOutput(sample=known * masked + mask * image)
