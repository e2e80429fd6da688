"""SD 3 / 3.5 and Flux.1: the families, told apart from tensor names and shapes, and their configs.

Detection reads only a safetensors header (names and shapes). The diffusers configs of every component
ship in ``configs.json``; the sizes in them (widths, depths, head counts) are replaced by what the file's
tensor shapes say, so a model of any size loads from its weights alone and nothing is fetched.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftool.core.errors import ModelError

CONFIGS = Path(__file__).with_name("configs.json")
#: The transformer's prefix in all-in-one checkpoints (ComfyUI's and Stability's layout).
PREFIX = "model.diffusion_model."
FLUX_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
SD3_MARKER = "joint_blocks.0.x_block.attn.qkv.weight"
Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class FlowFamily:
    """One flow-matching transformer family: its architecture (``sd3`` or ``flux``) and what it takes."""

    name: str
    label: str
    arch: str
    native_size: int = 1024
    #: Flux dev: the guidance scale is an input of the network (distilled guidance), not a second batch.
    guidance_embeds: bool = False
    inpainting: bool = False
    #: What a request that names neither gets: diffusers' pipeline defaults for the family (BFL's
    #: recommendations): Flux.1 dev 28 steps at distilled guidance 3.5, schnell 4 steps (guidance unused),
    #: Fill 50 at 30, SD 3 / 3.5 28 steps at CFG 7.
    steps: int = 28
    guidance_scale: float = 7.0

    def scheduler_config(self) -> dict[str, Any]:
        # Schnell is timestep-distilled without the resolution-dependent shift; dev and Fill use it.
        return dict(base_configs()["scheduler"]["flux-schnell" if self.name == "flux-schnell" else self.arch])


FAMILIES: dict[str, FlowFamily] = {
    f.name: f
    for f in (
        FlowFamily("sd3", "Stable Diffusion 3 / 3.5", "sd3"),
        FlowFamily("flux", "Flux.1 dev", "flux", guidance_embeds=True, guidance_scale=3.5),
        FlowFamily("flux-schnell", "Flux.1 schnell", "flux", steps=4, guidance_scale=0.0),
        FlowFamily(
            "flux-fill",
            "Flux.1 Fill (inpainting)",
            "flux",
            guidance_embeds=True,
            inpainting=True,
            steps=50,
            guidance_scale=30.0,
        ),
    )
}


def base_configs() -> dict[str, Any]:
    return json.loads(CONFIGS.read_text())


def transformer_shapes(shapes: Shapes) -> dict[str, tuple[int, ...]]:
    """The transformer's tensors with the all-in-one prefix removed (a transformer-only file has none)."""
    if any(k.startswith(PREFIX) for k in shapes):
        return {k[len(PREFIX) :]: tuple(v) for k, v in shapes.items() if k.startswith(PREFIX)}
    return {k: tuple(v) for k, v in shapes.items()}


def detect_shapes(shapes: Shapes) -> FlowFamily | None:
    """The family of a single file (BFL / ComfyUI / Stability key layout), or ``None`` if it is none of them."""
    t = transformer_shapes(shapes)
    if FLUX_MARKER in t:
        if "guidance_in.in_layer.weight" not in t:
            return FAMILIES["flux-schnell"]
        # Fill takes the packed latents plus the masked image and mask: 384 input features, not 64.
        return FAMILIES["flux-fill" if t["img_in.weight"][1] == 384 else "flux"]
    if SD3_MARKER in t:
        return FAMILIES["sd3"]
    return None


def detect_folder(path: Path) -> FlowFamily | None:
    """The family of a diffusers folder (``transformer/config.json``), or ``None``."""
    config_path = Path(path) / "transformer" / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    return family_from_config(config)


def family_from_config(config: Mapping[str, Any]) -> FlowFamily | None:
    kind = config.get("_class_name", "")
    if kind == "SD3Transformer2DModel":
        return FAMILIES["sd3"]
    if kind == "FluxTransformer2DModel":
        if not config.get("guidance_embeds"):
            return FAMILIES["flux-schnell"]
        return FAMILIES["flux-fill" if config.get("in_channels") == 384 else "flux"]
    return None


def _count(shapes: Shapes, pattern: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def flux_config(t: Shapes, family: FlowFamily) -> dict[str, Any]:
    """``FluxTransformer2DModel`` config from BFL-layout shapes (prefix removed)."""
    hidden, in_channels = t["img_in.weight"]
    head = int(t[FLUX_MARKER][0])
    # Flux.1's rotary axes are (16, 56, 56) for 128-wide heads: 1/8 for the (unused) index axis, 7/16 each for y, x.
    axes = (head // 8, head * 7 // 16, head * 7 // 16)
    if sum(axes) != head or any(a % 2 for a in axes):
        raise ModelError(f"a Flux transformer with {head}-wide attention heads is not supported", "use a Flux.1 model")
    return {
        "patch_size": 1,
        "in_channels": int(in_channels),
        "out_channels": int(t["final_layer.linear.weight"][0]),
        "num_layers": _count(t, r"double_blocks\.(\d+)\."),
        "num_single_layers": _count(t, r"single_blocks\.(\d+)\."),
        "attention_head_dim": head,
        "num_attention_heads": int(hidden) // head,
        "joint_attention_dim": int(t["txt_in.weight"][1]),
        "pooled_projection_dim": int(t["vector_in.in_layer.weight"][1]),
        "guidance_embeds": family.guidance_embeds,
        "axes_dims_rope": list(axes),
    }


def sd3_config(t: Shapes) -> dict[str, Any]:
    """``SD3Transformer2DModel`` config from Stability-layout shapes (prefix removed)."""
    hidden, in_channels, patch, _ = t["x_embedder.proj.weight"]
    norm = t.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head = int(norm[0]) if norm else 64  # SD3 and 3.5 use 64-wide heads; 3.5's RMS norms say so too
    positions = math.isqrt(int(t["pos_embed"][1]))
    return {
        "sample_size": min(128, positions),
        "patch_size": int(patch),
        "in_channels": int(in_channels),
        "out_channels": int(t["final_layer.linear.weight"][0]) // int(patch) ** 2,
        "num_layers": _count(t, r"joint_blocks\.(\d+)\."),
        "attention_head_dim": head,
        "num_attention_heads": int(hidden) // head,
        "joint_attention_dim": int(t["context_embedder.weight"][1]),
        "caption_projection_dim": int(t["context_embedder.weight"][0]),
        "pooled_projection_dim": int(t["y_embedder.mlp.0.weight"][1]),
        "pos_embed_max_size": positions,
        "qk_norm": "rms_norm" if norm else None,
        "dual_attention_layers": sorted({int(k.split(".")[1]) for k in t if ".x_block.attn2." in k}),
    }


def clip_config(shapes: Shapes, role: str) -> dict[str, Any]:
    """A CLIP text encoder's config (``role``: ``clip_l`` or ``clip_g``) from its transformers-layout shapes."""
    s = {k.removeprefix("text_model."): v for k, v in shapes.items()}
    vocab, hidden = s["embeddings.token_embedding.weight"]
    config = dict(base_configs()[role])
    config.update(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        max_position_embeddings=int(s["embeddings.position_embedding.weight"][0]),
        num_hidden_layers=_count(s, r"encoder\.layers\.(\d+)\."),
        intermediate_size=int(s["encoder.layers.0.mlp.fc1.weight"][0]),
        num_attention_heads=max(1, int(hidden) // 64),  # every CLIP text encoder uses 64-wide heads
    )
    if "text_projection.weight" in s:
        config["projection_dim"] = int(s["text_projection.weight"][0])
    else:
        config["projection_dim"] = int(hidden)
    return config


def t5_config(shapes: Shapes) -> dict[str, Any]:
    """A T5 encoder's config from its transformers-layout shapes."""
    vocab, d_model = shapes["shared.weight"] if "shared.weight" in shapes else shapes["encoder.embed_tokens.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    config = dict(base_configs()["t5xxl"])
    config.update(
        vocab_size=int(vocab),
        d_model=int(d_model),
        num_heads=int(heads),
        relative_attention_num_buckets=int(buckets),
        d_kv=int(shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]) // int(heads),
        d_ff=int(shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]),
        num_layers=_count(shapes, r"encoder\.block\.(\d+)\."),
    )
    return config


def vae_config(shapes: Shapes, family: FlowFamily) -> dict[str, Any]:
    """The 16-channel VAE's config from its original (LDM) layout shapes, with the family's latent scaling."""
    config = dict(base_configs()["vae"])
    levels = _count(shapes, r"encoder\.down\.(\d+)\.")
    config["block_out_channels"] = [int(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0]) for i in range(levels)]
    config["down_block_types"] = ["DownEncoderBlock2D"] * levels
    config["up_block_types"] = ["UpDecoderBlock2D"] * levels
    config["layers_per_block"] = _count(shapes, r"encoder\.down\.0\.block\.(\d+)\.")
    config["latent_channels"] = int(shapes["decoder.conv_in.weight"][1])
    config["scaling_factor"], config["shift_factor"] = base_configs()["vae_factors"][family.arch]
    return config
