"""Tiny random IP-Adapters and CLIP image encoders for tests, saved as people have them: the adapter in
the original key layout (``image_proj.*``, ``ip_adapter.N.to_k_ip/to_v_ip``), the encoder as a
transformers folder or one ``.safetensors``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def image_encoder(seed: int = 0, projection_dim: int = 16, hidden_size: int = 32) -> Any:
    """A tiny ``CLIPVisionModelWithProjection`` (32 px images, 8 px patches, one head)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=1,
        image_size=32,
        patch_size=8,
        hidden_act="gelu",
    )
    return CLIPVisionModelWithProjection(config).eval()


def _ip_layers(unet: Any, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``ip_adapter.N.to_k_ip/to_v_ip`` for each cross-attention layer, N = 1, 3, 5 ... (the original's)."""
    out, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name.removesuffix(".processor"))
        shape = (attn.to_k.weight.shape[0], unet.config.cross_attention_dim)
        for kind in ("to_k_ip", "to_v_ip"):
            out[f"ip_adapter.{key}.{kind}.weight"] = torch.randn(shape, generator=generator) * 0.3
        key += 2
    return out


def adapter(unet: Any, embed_dim: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A plain IP-Adapter for ``unet`` taking ``embed_dim`` image embeds: 4 tokens (ImageProjection)."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    state = {
        "image_proj.proj.weight": torch.randn(4 * cross, embed_dim, generator=g) * 0.5,
        "image_proj.proj.bias": torch.randn(4 * cross, generator=g) * 0.1,
        "image_proj.norm.weight": 1 + torch.randn(cross, generator=g) * 0.1,
        "image_proj.norm.bias": torch.randn(cross, generator=g) * 0.1,
    }
    return {**state, **_ip_layers(unet, g)}


def plus_adapter(unet: Any, embed_dim: int = 32, seed: int = 0, dim: int = 64, queries: int = 4) -> dict[str, Any]:
    """An IP-Adapter Plus (the original Resampler: 4 layers, 64-wide heads) over ``embed_dim`` hidden states."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(shape, generator=g) * scale

    state = {
        "image_proj.latents": rand(1, queries, dim, scale=1.0),
        "image_proj.proj_in.weight": rand(dim, embed_dim),
        "image_proj.proj_in.bias": rand(dim, scale=0.05),
        "image_proj.proj_out.weight": rand(cross, dim),
        "image_proj.proj_out.bias": rand(cross, scale=0.05),
        "image_proj.norm_out.weight": 1 + rand(cross, scale=0.05),
        "image_proj.norm_out.bias": rand(cross, scale=0.05),
    }
    for i in range(4):
        p = f"image_proj.layers.{i}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            state[p + norm + ".weight"] = 1 + rand(dim, scale=0.05)
            state[p + norm + ".bias"] = rand(dim, scale=0.05)
        state[p + "0.to_q.weight"] = rand(64, dim)
        state[p + "0.to_kv.weight"] = rand(128, dim)
        state[p + "0.to_out.weight"] = rand(dim, 64)
        state[p + "1.1.weight"] = rand(4 * dim, dim)
        state[p + "1.3.weight"] = rand(dim, 4 * dim)
    return {**state, **_ip_layers(unet, g)}


def save_adapter(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def save_encoder_file(encoder: Any, path: Path) -> Path:
    """The encoder as one ``.safetensors`` in transformers' key layout (ComfyUI's clip_vision files)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(path))
    return path
