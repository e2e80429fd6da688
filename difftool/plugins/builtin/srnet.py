"""SRNet: difftool's super-resolution denoiser, built like an SR network rather than a U-Net.

The network sees the noisy high-resolution residual and the bicubic upsample (the ``concat``
conditioning) pixel-unshuffled to the *low* resolution, runs residual blocks without normalisation
there, each modulated by the timestep (FiLM), and returns the clean residual through a pixel-shuffle
tail. Work happens at the low resolution (scale² times fewer pixels than a U-Net at the output size),
and nothing in it depends on the image size, so tiles of any multiple of ``scale`` run the same.

One SRNet serves one scale; a model folder for several scales holds one SRNet per scale
(see :mod:`difftool.plugins.builtin.pixel_model`). diffusers' ``ModelMixin``/``ConfigMixin`` give it
the same ``config.json`` + safetensors folder format and ``from_pretrained`` as the U-Nets.
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
class SRNetOutput(BaseOutput):
    """``.sample``: the predicted clean residual (the U-Nets' output convention; its module imports slowly)."""

    sample: torch.Tensor


class FiLMBlock(nn.Module):
    """conv - FiLM(t) - ReLU - conv, added back to the input (EDSR's block, no normalisation)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x) * (1 + gamma) + beta
        return x + self.conv2(F.relu(h))


class SRNet(ModelMixin, ConfigMixin):
    """``SRNet(sample, timestep) -> clean residual``; ``sample`` is the noisy residual + bicubic upsample.

    ``sample``: B x ``in_channels`` x H x W at the output resolution, H and W multiples of ``scale``.
    ``timestep``: scalar or one per batch item. ``class_labels`` is accepted and ignored (one scale).
    """

    @register_to_config
    def __init__(
        self,
        scale: int = 2,
        in_channels: int = 6,
        out_channels: int = 3,
        channels: int = 64,
        blocks: int = 16,
        embed_dim: int = 128,
    ) -> None:
        super().__init__()
        self.time_proj = Timesteps(embed_dim // 2, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(embed_dim // 2, embed_dim)
        self.film = nn.Linear(embed_dim, blocks * 2 * channels)
        nn.init.zeros_(self.film.weight)  # starts as a plain residual network
        nn.init.zeros_(self.film.bias)
        self.head = nn.Conv2d(in_channels * scale * scale, channels, 3, padding=1)
        self.body = nn.ModuleList(FiLMBlock(channels) for _ in range(blocks))
        self.body_out = nn.Conv2d(channels, channels, 3, padding=1)
        self.tail = nn.Conv2d(channels, out_channels * scale * scale, 3, padding=1)

    @property
    def multiple(self) -> int:
        """Height and width must be multiples of this."""
        return int(self.config.scale)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, class_labels: torch.Tensor | None = None
    ) -> SRNetOutput:
        batch, scale = sample.shape[0], int(self.config.scale)
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        film = self.film(F.silu(emb)).view(batch, len(self.body), 2, -1, 1, 1)
        x = self.head(F.pixel_unshuffle(sample, scale))
        h = x
        for index, block in enumerate(self.body):
            h = block(h, film[:, index, 0], film[:, index, 1])
        h = self.body_out(h) + x
        return SRNetOutput(sample=F.pixel_shuffle(self.tail(h), scale))
