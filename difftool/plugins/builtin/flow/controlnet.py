"""SD3 and Flux ControlNets from disk, offline: diffusers folders and single ``.safetensors`` files in the
diffusers key layout (InstantX's and Shakker-Labs' ``diffusion_pytorch_model.safetensors`` downloaded alone,
as ComfyUI users keep them in ``models/controlnet``), their family told from tensor names.

A single file carries no config: it is read from the tensor shapes (widths, depths, head sizes, union
modes, XLabs' hint block), as :mod:`.families` does for transformers. Not converted: XLabs' original
layout (``double_blocks.*`` beside ``controlnet_blocks.*``) and Stability's original SD 3.5 ControlNet
files; their diffusers conversions load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftool.core.atomic import file_sha256
from difftool.core.errors import ModelError
from difftool.core.runtime import current
from difftool.core.task import RunContext
from difftool.plugins.builtin.flow.families import _count
from difftool.plugins.builtin.sd import checkpoint

#: ``difftool models`` families of these ControlNets, by the transformer architecture they steer.
FAMILIES = {"sd3": "sd3-controlnet", "flux": "flux-controlnet"}
LABELS = {"sd3": "SD3", "flux": "Flux"}
#: "ControlNet X is {A_LABEL}, the model is ...": the one-line refusal of a mismatched pairing.
A_LABEL = {"sd3": "an SD3 ControlNet", "flux": "a Flux ControlNet"}
CLASSES = {"SD3ControlNetModel": "sd3", "FluxControlNetModel": "flux"}
_FLUX_MARKER = "controlnet_x_embedder.weight"
_SD3_MARKER = "pos_embed_input.proj.weight"
_XLABS_MARKER = "controlnet_blocks.0.weight"
Shapes = Mapping[str, Sequence[int]]
#: Flux ControlNets kept loaded between runs (each is 1 to 6.6 GB in bf16).
KEPT = 2


@dataclass
class FlowControlNet:
    """A loaded SD3 / Flux ControlNet: the diffusers module, the architecture it steers, its hash."""

    path: Path
    arch: str
    module: Any
    sha256: str

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def union(self) -> bool:
        return self.arch == "flux" and self.module.config.num_mode is not None


def arch_from_shapes(shapes: Shapes) -> str | None:
    """``sd3`` or ``flux`` for a ControlNet file's tensor names (diffusers layout, or XLabs' original), else None."""
    if _FLUX_MARKER in shapes or (_XLABS_MARKER in shapes and "double_blocks.0.img_attn.qkv.weight" in shapes):
        return "flux"
    if _SD3_MARKER in shapes and _XLABS_MARKER in shapes:
        return "sd3"
    return None


def arch_of(path: Path) -> str | None:
    """``sd3`` or ``flux`` for a ControlNet file or folder of these families (header or config only), else None."""
    path = Path(path)
    if path.is_dir():
        try:
            data = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return None
        return CLASSES.get(data.get("_class_name", "")) if isinstance(data, dict) else None
    if path.is_file() and path.suffix.lower() == ".safetensors":
        try:
            return arch_from_shapes(checkpoint.read_shapes(path))
        except ModelError:
            return None
    return None


def detect(path: Path) -> str | None:
    """``sd3-controlnet`` or ``flux-controlnet`` (what ``difftool models`` lists), else ``None``."""
    arch = arch_of(path)
    return FAMILIES[arch] if arch else None


def flux_config(shapes: Shapes) -> dict[str, Any]:
    """``FluxControlNetModel`` config from diffusers-layout shapes."""
    if _FLUX_MARKER not in shapes:
        raise ModelError(
            "this Flux ControlNet is in XLabs' original layout, which difftool does not convert",
            "use its diffusers conversion (a folder with config.json, or diffusers key names)",
        )
    hidden, in_channels = shapes["x_embedder.weight"]
    norm = "attn.norm_q.weight"
    head = int((shapes.get(f"transformer_blocks.0.{norm}") or shapes[f"single_transformer_blocks.0.{norm}"])[0])
    hint = shapes.get("input_hint_block.conv_out.weight")
    mode = shapes.get("controlnet_mode_embedder.weight")
    return {
        # XLabs-style: the hint block's channels x patch^2 make the packed latents' features
        "patch_size": math.isqrt(int(in_channels) // int(hint[0])) if hint else 1,
        "in_channels": int(in_channels),
        "num_layers": _count(shapes, r"transformer_blocks\.(\d+)\."),
        "num_single_layers": _count(shapes, r"single_transformer_blocks\.(\d+)\."),
        "attention_head_dim": head,
        "num_attention_heads": int(hidden) // head,
        "joint_attention_dim": int(shapes["context_embedder.weight"][1]),
        "pooled_projection_dim": int(shapes["time_text_embed.text_embedder.linear_1.weight"][1]),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        # Flux.1's rotary axes: (16, 56, 56) for 128-wide heads (see families.flux_config)
        "axes_dims_rope": [head // 8, head * 7 // 16, head * 7 // 16],
        "num_mode": int(mode[0]) if mode else None,
        "conditioning_embedding_channels": int(hint[0]) if hint else None,
    }


def sd3_config(shapes: Shapes, head: int = 64) -> dict[str, Any]:
    """``SD3ControlNetModel`` config from diffusers-layout shapes. Not in the weights: the head size when the
    attention has no q/k norms (``head``: the model's, 64 for every SD 3 / 3.5), and
    ``force_zeros_for_pooled_projection``, taken as InstantX's (True) when the ControlNet reads the text
    (has a ``context_embedder``) and as Stability's SD 3.5 ControlNets' (False) when it does not."""
    hidden, channels, patch, _ = shapes[_SD3_MARKER]
    norm = shapes.get("transformer_blocks.0.attn.norm_q.weight")
    head = int(norm[0]) if norm else head
    proj = shapes.get("pos_embed.proj.weight")
    in_channels = int(proj[1]) if proj else 16
    positions = math.isqrt(int(shapes["pos_embed.pos_embed"][1])) if "pos_embed.pos_embed" in shapes else 96
    context = shapes.get("context_embedder.weight")
    qk = "layer_norm" if "transformer_blocks.0.attn.norm_q.bias" in shapes else "rms_norm"
    return {
        "sample_size": min(128, positions) if proj else 128,
        "patch_size": int(patch),
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_layers": _count(shapes, r"transformer_blocks\.(\d+)\."),
        "attention_head_dim": head,
        "num_attention_heads": int(hidden) // head,
        "joint_attention_dim": int(context[1]) if context else None,
        "caption_projection_dim": int(context[0]) if context else int(hidden),
        "pooled_projection_dim": int(shapes["time_text_embed.text_embedder.linear_1.weight"][1]),
        "pos_embed_max_size": positions,
        "extra_conditioning_channels": int(channels) - in_channels,
        "dual_attention_layers": sorted({int(k.split(".")[1]) for k in shapes if k.split(".")[2:3] == ["attn2"]}),
        "qk_norm": qk if norm else None,
        "pos_embed_type": "sincos" if proj else None,
        "use_pos_embed": proj is not None,
        "force_zeros_for_pooled_projection": context is not None,
    }


def _classes() -> dict[str, Any]:
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    return {"sd3": SD3ControlNetModel, "flux": FluxControlNetModel}


def load(path: Path, dtype: Any = None, head: int = 64) -> FlowControlNet:
    """A ControlNet from a diffusers folder or a single diffusers-layout file, in ``dtype``; ``head``: the
    attention head size of the model it steers (what an SD3 file without q/k norms does not say)."""
    from difftool.core.safetensors_check import check_safetensors
    from difftool.plugins.builtin.flow.convert import _assign

    path = Path(path)
    arch = arch_of(path)
    if arch is None:
        raise ModelError(f"{path.name} is not an SD3 or Flux ControlNet", "pass a ControlNet file or folder")
    cls = _classes()[arch]
    if path.is_dir():
        weights = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
        if not weights:
            raise ModelError(f"{path} holds no safetensors weights", "convert them to safetensors")
        for file in weights:
            check_safetensors(file)
        try:
            module = cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load the ControlNet {path}: {_first_line(exc)}", "check its weights") from exc
        return FlowControlNet(path, arch, module.eval().requires_grad_(False), file_sha256(weights[0]))
    from safetensors.torch import load_file

    shapes = checkpoint.read_shapes(path)
    config = flux_config(shapes) if arch == "flux" else sd3_config(shapes, head)
    state = load_file(str(path))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module = _assign(cls, config, state, f"the {LABELS[arch]} ControlNet {path.name}")
    return FlowControlNet(path, arch, module, file_sha256(path))


def check_pairing(net: FlowControlNet, family: Any, transformer: Any) -> None:
    """Refuse a ControlNet made for another architecture or width than the model's, in one line naming both."""
    inner = net.module.config.num_attention_heads * net.module.config.attention_head_dim
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    if net.arch != family.arch or inner != width:
        raise ModelError(
            f"ControlNet {net.name} is {A_LABEL[net.arch]} ({inner} wide), the model is {family.label} ({width} wide)",
            f"use a ControlNet made for {family.label} (`difftool models` lists each one's family)",
        )


def share_pos_embed(net: FlowControlNet, transformer: Any) -> None:
    """Stability's SD 3.5 ControlNets (``use_pos_embed`` off) have no patch embedding of their own: they take
    the transformer's, as diffusers' StableDiffusion3ControlNetPipeline sets it up (each run: the net is cached
    apart from the model)."""
    if net.arch == "sd3" and net.module.config.use_pos_embed is False:
        first = next(net.module.parameters())
        net.module.pos_embed = net.module._get_pos_embed_from_transformer(transformer).to(first.device, first.dtype)


def loaded(path: Path, context: RunContext, head: int = 64) -> FlowControlNet:
    """Load (or reuse) a ControlNet on the run's device in its precision; keeps the :data:`KEPT` used last."""
    import torch

    key = (str(path.resolve()), path.stat().st_mtime_ns, context.dtype, context.device, head)
    cache: dict[Any, FlowControlNet] = current().cache("flow-controlnets", dict)
    if key not in cache:
        net = load(path, context.torch_dtype, head)
        torch.nn.Module.to(net.module, device=context.torch_device)
        cache[key] = net
    cache[key] = cache.pop(key)  # most recently used last
    while len(cache) > KEPT:
        del cache[next(iter(cache))]
    return cache[key]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
