"""SD3's and Flux's transformer as ONNX: exported, validated against PyTorch and cached like the U-Net.

The export goes through :func:`~difftool.exporters.onnx_modules.cached_module_export` (the same cache key,
validation report and external-data rule as every module export: weights over
:data:`~difftool.exporters.onnx_fp16.EXTERNAL_DATA_BYTES` go to ``model.onnx.data``, as a Flux-size
transformer needs). What the graph takes:

- Flux: the packed latents ``hidden_states`` (batch, image tokens, 4 x channels), ``encoder_hidden_states``
  (batch, text tokens, width), ``pooled_projections``, ``timestep`` (already / 1000, as Flux expects),
  ``img_ids`` (image tokens, 3), ``txt_ids`` (text tokens, 3) and, guidance-distilled, ``guidance``;
  batch, image tokens and text tokens are dynamic.
- SD3: the latents ``hidden_states`` (batch, channels, h, w) with h and w dynamic in multiples of the
  patch size (the image tokens are (h / 2) x (w / 2)), ``encoder_hidden_states``, ``pooled_projections``
  and ``timestep``.

The graph is always fp32: fp8-stored weights (:mod:`~difftool.plugins.builtin.flow.fp8`) and GGUF ones
are upcast into a plain copy first (an ONNX graph holds no fp8 layer-by-layer casting; a TensorRT 10
build then runs it in fp16 or bf16 with its precision flag).
"""

from __future__ import annotations

import hashlib
import types
from dataclasses import dataclass
from typing import Any

import torch

from difftool.core.errors import ParameterError
from difftool.exporters.onnx_modules import ModuleSpec

#: Relative error allowed against PyTorch fp32 (the U-Net's 1e-4 plus room for attention's summation
#: order over a few hundred tokens: measured 2e-5 to 8e-5 on the tiny test models).
TOLERANCE = 5e-4
#: Largest batch and text length the exported graph takes (the profile narrows it for TensorRT).
MAX_BATCH, MAX_TEXT = 64, 4096


@dataclass(frozen=True)
class TransformerSignature:
    """What the exported transformer takes, read from its config."""

    arch: str
    #: Channels of the core's latent sample (16): Flux packs them 2 x 2 into 64-wide tokens.
    sample_channels: int
    text_dim: int
    pooled_dim: int
    #: Width of the graph's ``hidden_states`` (Flux: the packed token; SD3: the latent's channels).
    in_features: int = 16
    guidance: bool = False
    #: SD3: the patch size (latent sides in its multiples) and the largest side in latent cells
    #: (its cropped position embedding); Flux: 2 (the packing) and no limit of its own.
    patch: int = 2
    max_side: int = 1024

    @classmethod
    def of(cls, module: Any, arch: str) -> TransformerSignature:
        config = module.config
        channels = int(config.out_channels or config.in_channels)
        common = dict(text_dim=int(config.joint_attention_dim), pooled_dim=int(config.pooled_projection_dim),
                      in_features=int(config.in_channels))  # fmt: skip
        if arch == "flux":
            return cls("flux", channels // 4, guidance=bool(config.guidance_embeds), **common)  # type: ignore[arg-type]
        patch = int(config.patch_size)
        return cls("sd3", channels, patch=patch, max_side=int(config.pos_embed_max_size) * patch, **common)  # type: ignore[arg-type]

    @property
    def in_channels(self) -> int:
        return self.sample_channels

    def input_names(self) -> list[str]:
        names = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
        if self.arch == "flux":
            names += ["img_ids", "txt_ids"] + (["guidance"] if self.guidance else [])
        return names


class FluxGraph(torch.nn.Module):
    def __init__(self, module: Any) -> None:
        super().__init__()
        self.module = module

    def forward(
        self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance=None
    ):  # type: ignore[no-untyped-def]  # noqa: E501
        return self.module(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids,
            guidance=guidance, return_dict=False,
        )[0]  # fmt: skip


class SD3Graph(torch.nn.Module):
    def __init__(self, module: Any) -> None:
        super().__init__()
        self.module = module

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):  # type: ignore[no-untyped-def]
        return self.module(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections, timestep=timestep, return_dict=False,
        )[0]  # fmt: skip


def _cropped_pos_embed(self: Any, height: int, width: int) -> torch.Tensor:
    """diffusers' ``PatchEmbed.cropped_pos_embed`` with the crop's offset written without a negative floor
    division: torch.export rewrites ``(M - h) // 2`` as ``M // 2 + (-h) // 2``, which ONNX's truncating
    division gets wrong for odd h (the exported graph then fails for any odd number of patch rows)."""
    side = self.pos_embed_max_size
    height, width = height // self.patch_size, width // self.patch_size
    top = side // 2 - (height - side % 2 + 1) // 2  # == (side - height) // 2 for 1 <= height
    left = side // 2 - (width - side % 2 + 1) // 2
    spatial = self.pos_embed.reshape(1, side, side, -1)[:, top : top + height, left : left + width, :]
    return spatial.reshape(1, -1, spatial.shape[-1])


def export_copy(module: Any) -> Any:
    """An fp32 CPU copy of ``module`` with plain weights (fp8 and GGUF upcast); ``module`` is untouched."""
    from difftool.exporters.onnx import cpu_fp32
    from difftool.plugins.builtin.flow.gguf_files import is_quantised

    if getattr(module, "_difftool_storage_dtype", None) is None and not is_quantised(module):
        copy = cpu_fp32(module)  # the module itself when it is fp32 on the CPU already
    else:
        # fp8 layerwise casting hooks (and GGUF parameters) would survive a deepcopy: a fresh module instead
        from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

        def plain(tensor: torch.Tensor) -> torch.Tensor:
            tensor = dequantize_gguf_tensor(tensor) if isinstance(tensor, GGUFParameter) else tensor
            return tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else None)

        copy = type(module).from_config(module.config)
        copy.load_state_dict({name: plain(t) for name, t in module.state_dict().items()})
    copy = copy.eval().requires_grad_(False)
    embed = getattr(copy, "pos_embed", None)
    if getattr(embed, "pos_embed_max_size", None):
        # on the run's own model too when it is the copy: the crop is the same for every size it takes
        embed.cropped_pos_embed = types.MethodType(_cropped_pos_embed, embed)
    return copy


def graph_of(module: Any, signature: TransformerSignature) -> torch.nn.Module:
    return (FluxGraph if signature.arch == "flux" else SD3Graph)(module).eval()


def example_inputs(signature: TransformerSignature, batch: int, h: int, w: int, text: int, seed: int = 0) -> dict:
    """Random inputs for a latent of h x w patches and ``text`` tokens, by input name."""
    g = torch.Generator().manual_seed(seed)
    p, c = signature.patch, signature.in_features
    inputs = {
        "hidden_states": torch.randn(batch, h * w, signature.in_features, generator=g)
        if signature.arch == "flux"
        else torch.randn(batch, c, h * p, w * p, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, signature.text_dim, generator=g),
        "pooled_projections": torch.randn(batch, signature.pooled_dim, generator=g),
        "timestep": torch.rand(batch, generator=g) * (1 if signature.arch == "flux" else 1000),
    }
    if signature.arch == "flux":
        from difftool.plugins.builtin.flow.denoiser import image_ids

        inputs |= {"img_ids": image_ids(h, w, torch.device("cpu"), torch.float32), "txt_ids": torch.zeros(text, 3)}
        if signature.guidance:
            inputs["guidance"] = torch.rand(batch, generator=g) * 5
    return inputs


class TransformerSpec(ModuleSpec):
    """A :class:`ModuleSpec` whose SD3 latent sides are multiples of the patch size (``ModuleSpec``'s
    dimensions are plain ranges; torch.export needs ``patch * Dim`` to see the sides divide)."""

    patch: int = 2

    def dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        shapes = super().dynamic_shapes()
        if "img_ids" in self.inputs:  # Flux: the token axes are plain dimensions
            return shapes
        dims = {name: torch.export.Dim(name, min=low, max=high) for name, (_, low, high) in (
            ("h", self.dynamic["hidden_states"][2]), ("w", self.dynamic["hidden_states"][3]))}  # fmt: skip
        first = dict(shapes[0]) | {2: self.patch * dims["h"], 3: self.patch * dims["w"]}
        return (first, *shapes[1:])


def module_spec(signature: TransformerSignature) -> ModuleSpec:
    """Example and check inputs (odd sizes, batch 1 and 3: no 0/1 specialisation) and dynamic axes."""
    batch, text = ("batch", 1, MAX_BATCH), ("text", 1, MAX_TEXT)
    axes: dict[str, dict[int, tuple[str, int, int]]] = {
        "encoder_hidden_states": {0: batch, 1: text},
        "pooled_projections": {0: batch},
        "timestep": {0: batch},
    }
    if signature.arch == "flux":
        tokens = ("tokens", 1, (signature.max_side // 2) ** 2)
        axes |= {"hidden_states": {0: batch, 1: tokens}, "img_ids": {0: tokens}, "txt_ids": {0: text}}
        axes |= {"guidance": {0: batch}} if signature.guidance else {}
    else:  # sides in patches (2 at least: a single patch row specialises the graph)
        patches = signature.max_side // signature.patch
        axes["hidden_states"] = {0: batch, 2: ("h", 2, patches), 3: ("w", 2, patches)}
    small = min(signature.max_side // signature.patch, 8)
    spec = TransformerSpec(
        inputs=example_inputs(signature, 2, small - 1, small - 2, 7),
        dynamic=axes,
        outputs=("out",),
        checks=(example_inputs(signature, 1, 3, 2, 5, seed=1), example_inputs(signature, 3, small, 4, 9, seed=2)),
        tolerance=TOLERANCE,
    )
    object.__setattr__(spec, "patch", signature.patch)
    return spec


def transformer_id(model: Any) -> str:
    """Names the transformer's weights as loaded: the model file's hash, its LoRAs, the dtype it was loaded in
    (a bf16 load rounds the weights an fp32 export then holds) and its storage (fp8, GGUF)."""
    from difftool.plugins.builtin.flow.gguf_files import is_quantised

    module = model.transformer
    storage = getattr(module, "_difftool_storage_dtype", None) or ("gguf" if is_quantised(module) else "")
    parts = [model.sha256, *(f"{name}:{weight}:{digest}" for name, weight, digest in model.loras)]
    parts += [str(module.dtype), str(storage)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def cached_transformer(model: Any) -> tuple[Any, TransformerSignature]:
    """The validated ONNX export of ``model``'s transformer (a cache entry), exported on first use."""
    from difftool.exporters.onnx_modules import cached_module_export

    signature = TransformerSignature.of(model.transformer, model.family.arch)
    model_id = transformer_id(model)
    entry = cached_module_export(
        lambda: graph_of(export_copy(model.transformer), signature),
        f"transformer-{model.family.arch}-{model_id[:12]}",
        module_spec(signature),
        f"{model_id}-{signature.arch}",
    )
    return entry, signature


def check_latent(signature: TransformerSignature, h: int, w: int) -> None:
    """Refuse, in one line, a latent the exported SD3 graph cannot take (past its position embedding)."""
    if signature.arch == "sd3" and max(h, w) > signature.max_side:
        raise ParameterError(
            f"this SD3 model takes latents of at most {signature.max_side} cells a side, got {w}x{h}",
            "pick a smaller --width/--height",
        )


def graph_inputs(
    signature: TransformerSignature, sample: torch.Tensor, timestep: Any, cond: Any, device: Any
) -> dict[str, torch.Tensor]:
    """The exported graph's inputs for one denoiser call (what :class:`TransformerDenoiser` passes the module),
    contiguous fp32 tensors on ``device`` by name."""
    from difftool.plugins.builtin.flow.denoiser import image_ids, pack

    x = sample.to(device, torch.float32)
    batch, (h, w) = x.shape[0], x.shape[-2:]
    check_latent(signature, h, w)
    t = torch.as_tensor(timestep, dtype=torch.float32).to(device).reshape(-1).expand(batch)
    text = cond["encoder_hidden_states"].to(device, torch.float32)
    inputs = {
        "hidden_states": pack(x) if signature.arch == "flux" else x,
        "encoder_hidden_states": text,
        "pooled_projections": cond["pooled_projections"].to(device, torch.float32),
        "timestep": t / 1000 if signature.arch == "flux" else t,
    }
    if signature.arch == "flux":
        inputs["img_ids"] = image_ids(h // 2, w // 2, device, torch.float32)
        inputs["txt_ids"] = torch.zeros(text.shape[1], 3, device=device)
        if signature.guidance:
            scale = cond.get("guidance")
            scale = torch.full((1,), 1.0) if scale is None else torch.as_tensor(scale, dtype=torch.float32)
            inputs["guidance"] = scale.reshape(-1).to(device, torch.float32).expand(batch)
    return {name: tensor.contiguous() for name, tensor in inputs.items()}
