"""kohya / sd-scripts SD3 LoRAs (``lora_unet_joint_blocks_0_x_block_attn_qkv``, ``lora_te1_*``) in the
diffusers / peft layout that diffusers' SD3 loader reads (it converts no other layout itself).

Module names are Stability's MMDiT names with ``_`` for ``.``. A fused ``qkv`` becomes three LoRAs that
share ``lora_down`` (their ``lora_up`` split in three), as diffusers does for Flux's kohya files; ``alpha /
rank`` is folded into the two matrices; the adaLN modulations diffusers stores as (scale, shift) where
Stability stores (shift, scale) get their ``lora_up`` halves swapped, as the checkpoint conversion does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from difftool.core.errors import ModelError

if TYPE_CHECKING:
    import torch

BLOCK = re.compile(r"joint_blocks_(\d+)_(x_block|context_block)_(.+)")
#: (block side, Stability module) -> diffusers module(s) inside ``transformer_blocks.N``.
IN_BLOCK = {
    ("x_block", "attn_qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("x_block", "attn_proj"): ("attn.to_out.0",),
    ("x_block", "attn2_qkv"): ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    ("x_block", "attn2_proj"): ("attn2.to_out.0",),
    ("x_block", "mlp_fc1"): ("ff.net.0.proj",),
    ("x_block", "mlp_fc2"): ("ff.net.2",),
    ("x_block", "adaLN_modulation_1"): ("norm1.linear",),
    ("context_block", "attn_qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("context_block", "attn_proj"): ("attn.to_add_out",),
    ("context_block", "mlp_fc1"): ("ff_context.net.0.proj",),
    ("context_block", "mlp_fc2"): ("ff_context.net.2",),
    ("context_block", "adaLN_modulation_1"): ("norm1_context.linear",),
}
OUTSIDE = {
    "context_embedder": "context_embedder",
    "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
    "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
ENCODERS = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
CLIP_LAYER = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)")


def is_kohya_sd3(state: Mapping[str, Any]) -> bool:
    return any(k.startswith("lora_unet_joint_blocks_") for k in state)


def _swap(up: torch.Tensor) -> torch.Tensor:
    import torch

    shift, scale = up.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _targets(name: str, layers: int) -> tuple[str, tuple[str, ...], bool]:
    """(component, diffusers modules, swap halves) for a kohya module name (prefix included)."""
    for prefix, component in ENCODERS.items():
        if name.startswith(prefix) and (m := CLIP_LAYER.fullmatch(name[len(prefix) :])):
            return component, (f"text_model.encoder.layers.{m[1]}.{m[2]}.{m[3]}",), False
    body = name.removeprefix("lora_unet_")
    if body in OUTSIDE:
        return "transformer", (OUTSIDE[body],), body == "final_layer_adaLN_modulation_1"
    if (m := BLOCK.fullmatch(body)) and (m[2], m[3]) in IN_BLOCK:
        last = int(m[1]) == layers - 1 and m[2] == "context_block" and m[3] == "adaLN_modulation_1"
        return "transformer", tuple(f"transformer_blocks.{m[1]}.{t}" for t in IN_BLOCK[m[2], m[3]]), last
    raise ModelError(f"the SD3 LoRA module {name} is not one difftool can place", "pass a LoRA made for SD 3 / 3.5")


def to_peft(state: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A kohya SD3 LoRA as ``{component}.{module}.lora_A/lora_B.weight``; ``layers``: the transformer's depth
    (its last block's context modulation is the one diffusers reorders)."""
    out: dict[str, torch.Tensor] = {}
    for key in sorted(k for k in state if k.endswith(".lora_down.weight")):
        name = key.removesuffix(".lora_down.weight")
        down, up = state[key].float(), state[f"{name}.lora_up.weight"].float()
        rank = down.shape[0]
        scale = float(state[f"{name}.alpha"]) / rank if f"{name}.alpha" in state else 1.0
        component, modules, swap = _targets(name, layers)
        ups = up.chunk(len(modules), dim=0) if len(modules) > 1 else (up,)
        for module, part in zip(modules, ups, strict=True):
            out[f"{component}.{module}.lora_A.weight"] = down * scale
            out[f"{component}.{module}.lora_B.weight"] = _swap(part) if swap else part
    return out
