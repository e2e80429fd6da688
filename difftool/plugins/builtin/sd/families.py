"""Stable Diffusion model families: what each needs, and how to tell them apart from tensor shapes.

The diffusers configs of every family ship in ``configs/<family>/`` (diffusers would otherwise fetch
them from the hub when it converts a single-file checkpoint). Detection reads only tensor names and
shapes (a safetensors header), never the weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftool.core.errors import ModelError

CONFIG_ROOT = Path(__file__).with_name("configs")
UNET_PREFIX = "model.diffusion_model."
UNET_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
#: SDXL's pooled-text/size embedding; only SDXL-style U-Nets have it.
UNET_ADD_EMBED = UNET_PREFIX + "label_emb.0.0.weight"


@dataclass(frozen=True)
class Family:
    """One architecture family: its configs, native resolution and text encoders."""

    name: str
    label: str
    native_size: int
    #: Tokenizer kind per text encoder (``clip`` pads with end-of-text, ``openclip`` with "!").
    tokenizers: tuple[str, ...]
    inpainting: bool = False
    xl: bool = False
    #: An SDXL refiner: finishes another model's latents (``--refiner``); text_encoder_2 only, aesthetic score.
    refiner: bool = False

    @property
    def config_dir(self) -> Path:
        return CONFIG_ROOT / self.name

    def config(self, component: str) -> dict[str, Any]:
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        return json.loads((self.config_dir / component / name).read_text())

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """The diffusers folder names of the text encoders (a refiner has only SDXL's second one)."""
        if self.refiner:
            return ("text_encoder_2",)
        return ("text_encoder", "text_encoder_2")[: len(self.tokenizers)]


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd1", "Stable Diffusion 1.x", 512, ("clip",)),
        Family("sd1-inpaint", "Stable Diffusion 1.x inpainting", 512, ("clip",), inpainting=True),
        Family("sd2", "Stable Diffusion 2.x", 768, ("openclip",)),
        Family("sd2-inpaint", "Stable Diffusion 2.x inpainting", 512, ("openclip",), inpainting=True),
        Family("sdxl", "Stable Diffusion XL base", 1024, ("clip", "openclip"), xl=True),
        Family("sdxl-inpaint", "Stable Diffusion XL inpainting", 1024, ("clip", "openclip"), inpainting=True, xl=True),
        Family("sdxl-refiner", "Stable Diffusion XL refiner", 1024, ("openclip",), xl=True, refiner=True),
    )
}
#: The families a task runs as its ``--model`` (a refiner only finishes another model's image).
BASE_FAMILIES: tuple[str, ...] = tuple(name for name, family in FAMILIES.items() if not family.refiner)
#: The refiner's OpenCLIP-G text encoder, first (and only) in its single-file layout; diffusers' marker.
REFINER_TEXT_KEY = "conditioner.embedders.0.model.text_projection"
#: Cross-attention width -> family base name (the text encoder's hidden size).
_BY_CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def family_for(base: str, in_channels: int) -> Family:
    if in_channels == 4:
        return FAMILIES[base]
    if in_channels == 9:
        return FAMILIES[f"{base}-inpaint"]
    raise ModelError(
        f"the U-Net takes {in_channels} input channels, which no supported family has (4: txt2img, 9: inpainting)",
        "use an SD 1.x, 2.x or SDXL base or inpainting checkpoint",
    )


def detect_family(shapes: Mapping[str, Sequence[int]], what: str = "the checkpoint") -> Family:
    """The family of a single-file checkpoint in the original (LDM / A1111 / ComfyUI) key layout."""
    if UNET_CONV_IN not in shapes:
        raise ModelError(f"{what} has no Stable Diffusion U-Net: {describe(shapes)}", fix_for(shapes))
    in_channels = int(shapes[UNET_CONV_IN][1])
    context_dims = {
        int(shape[1])
        for key, shape in shapes.items()
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight")
    }
    if len(context_dims) != 1:
        raise ModelError(f"{what} has a U-Net without one cross-attention width ({sorted(context_dims)})", fix_for({}))
    dim = context_dims.pop()
    if UNET_ADD_EMBED in shapes and (dim == 1280 or REFINER_TEXT_KEY in shapes):
        if in_channels != 4:
            raise ModelError(f"{what} is an SDXL refiner with {in_channels} input channels", fix_for({}))
        return FAMILIES["sdxl-refiner"]
    base = _BY_CONTEXT_DIM.get(dim)
    if base is None or (base == "sdxl") != (UNET_ADD_EMBED in shapes):
        raise ModelError(f"{what} is a U-Net with {dim}-wide cross-attention, not a supported family", fix_for({}))
    return family_for(base, in_channels)


def family_from_unet_config(config: Mapping[str, Any], folder: Path | None = None) -> Family:
    """The family of a diffusers-format U-Net config (a model folder or a sidecar config).

    An SDXL-style U-Net is a refiner when its width says so (SDXL refiner 1.0: 1280-wide cross-attention,
    2560 added-embedding inputs) or, for other sizes, when ``folder`` (the model or sidecar folder) has
    ``text_encoder_2`` but no ``text_encoder``, or a ``model_index.json`` asking for the aesthetic score.
    """
    if config.get("addition_embed_type") == "text_time":
        if int(config.get("in_channels", 4)) == 4 and _is_refiner(config, folder):
            return FAMILIES["sdxl-refiner"]
        base = "sdxl"
    else:
        # SD 2.x U-Nets use linear projections in their transformer blocks; SD 1.x use 1x1 convolutions.
        base = "sd2" if config.get("use_linear_projection") else "sd1"
    return family_for(base, int(config.get("in_channels", 4)))


def _is_refiner(config: Mapping[str, Any], folder: Path | None) -> bool:
    if config.get("cross_attention_dim") == 1280 or config.get("projection_class_embeddings_input_dim") == 2560:
        return True
    if folder is None:
        return False
    index = folder / "model_index.json"
    if index.is_file():
        try:
            if json.loads(index.read_text()).get("requires_aesthetics_score"):
                return True
        except (OSError, ValueError):
            pass
    return (folder / "text_encoder_2").is_dir() and not (folder / "text_encoder").is_dir()


def is_controlnet(shapes: Mapping[str, Sequence[int]]) -> bool:
    """A ControlNet's conditioning-image encoder: original layout (maybe ``control_model.``-prefixed) or diffusers'."""
    hints = ("input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight")
    return any(k.endswith(hints[0]) or k == hints[1] for k in shapes)


def component_kind(shapes: Mapping[str, Sequence[int]]) -> str:
    """What a weights file holds: ``checkpoint``, ``vae``, ``lora``, ``controlnet`` or ``unknown``."""
    keys = list(shapes)
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return "checkpoint"
    if is_controlnet(shapes):
        return "controlnet"
    if any("lora_" in k or ".lora." in k or "lora_A" in k for k in keys):
        return "lora"
    vae_prefixes = ("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.", "first_stage_model.")
    if any(k.startswith(vae_prefixes) for k in keys):
        return "vae"
    return "unknown"


def describe(shapes: Mapping[str, Sequence[int]]) -> str:
    """A short account of what a file holds: tensor count and top-level key prefixes."""
    prefixes = sorted({k.split(".")[0] for k in shapes})
    shown = ", ".join(prefixes[:5]) + (", ..." if len(prefixes) > 5 else "")
    return f"found {len(shapes)} tensors ({component_kind(shapes)}; key prefixes: {shown or 'none'})"


def fix_for(shapes: Mapping[str, Sequence[int]]) -> str:
    kind = component_kind(shapes)
    if kind == "lora":
        return "this is a LoRA: pass it with --lora PATH beside a --model checkpoint"
    if kind == "vae":
        return "this is a VAE: pass it with --vae PATH beside a --model checkpoint"
    if kind == "controlnet":
        return "this is a ControlNet: pass it with --control PATH=IMAGE beside a --model checkpoint"
    return "pass an SD 1.x, SD 2.x, SDXL or SDXL refiner checkpoint (.safetensors) or a diffusers model folder"
