"""Building an SD3 / Flux model's diffusers modules from state dicts in the layouts people download.

The transformer's key conversion is diffusers' own (``single_file_utils``); the config comes from the
tensor shapes (:mod:`families`). Modules are created without weights (accelerate's empty init) and take
the file's tensors as they are, so a 12B transformer is never initialised at random first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from difftool.core.errors import ModelError
from difftool.plugins.builtin.flow.families import (
    PREFIX,
    FlowFamily,
    clip_config,
    flux_config,
    sd3_config,
    t5_config,
    transformer_shapes,
    vae_config,
)

if TYPE_CHECKING:
    import torch

State = Mapping[str, "torch.Tensor"]
#: diffusers' Flux conversion splits single blocks' fused projection at Flux.1's width.
FLUX_WIDTH = 3072


def shapes_of(state: State) -> dict[str, tuple[int, ...]]:
    # A GGUF tensor's stored shape is its quantised bytes; ``quant_shape`` is the model's.
    return {k: tuple(getattr(v, "quant_shape", v.shape)) for k, v in state.items()}


def strip(state: State, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, with it removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _assign(cls: Any, config: Any, state: Mapping[str, Any], what: str) -> Any:
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables, ids) real
        module = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    own = module.state_dict()
    extra = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if own[k].is_meta)
    if extra or missing:
        name, kind = (extra[0], "unexpected") if extra else (missing[0], "missing")
        raise ModelError(f"{what}: weight {name} is {kind} ({len(extra)} unexpected, {len(missing)} missing)",
                         "pass an intact file of this model family")  # fmt: skip
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise ModelError(
                f"{what}: weight {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}",
                "pass weights made for this model family",
            )
    module.load_state_dict(dict(state), strict=False, assign=True)
    return module.eval().requires_grad_(False)


def transformer(state: State, family: FlowFamily) -> Any:
    """The denoising transformer from a BFL / Stability layout state dict (all-in-one prefix or none)."""
    cls, config, converted = transformer_parts(state, family)
    return _assign(cls, config, converted, f"the {family.label} transformer")


def transformer_parts(state: State, family: FlowFamily) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(diffusers class, config from the shapes, diffusers-layout state dict) of a BFL / Stability transformer."""
    t = strip(state, PREFIX) if any(k.startswith(PREFIX) for k in state) else dict(state)
    shapes = transformer_shapes(shapes_of(t))
    try:
        if family.arch == "flux":
            from diffusers import FluxTransformer2DModel

            config = flux_config(shapes, family)
            return FluxTransformer2DModel, config, _convert_flux(t, config)
        from diffusers import SD3Transformer2DModel
        from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

        config = sd3_config(shapes)
        return SD3Transformer2DModel, config, convert_sd3_transformer_checkpoint_to_diffusers(dict(t))
    except KeyError as error:
        raise ModelError(f"the {family.label} transformer lacks weight {error}", "use an intact file") from None


def _convert_flux(t: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    import torch
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    width = config["num_attention_heads"] * config["attention_head_dim"]
    t, fused = dict(t), {}
    if width != FLUX_WIDTH:
        # Its single-block split assumes 3072 wide: hand it empty stand-ins, then split the real tensors here.
        rows = FLUX_WIDTH * 7
        for i in range(config["num_single_layers"]):
            weight, bias = (t.pop(f"single_blocks.{i}.linear1.{p}") for p in ("weight", "bias"))
            fused[i] = (weight, bias)
            t[f"single_blocks.{i}.linear1.weight"], t[f"single_blocks.{i}.linear1.bias"] = (
                torch.empty(rows, 0), torch.empty(rows),
            )  # fmt: skip
    out = convert_flux_transformer_checkpoint_to_diffusers(t)
    for i, (weight, bias) in fused.items():
        sizes = (width, width, width, weight.shape[0] - 3 * width)
        for name, w, b in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                              torch.split(weight, sizes), torch.split(bias, sizes), strict=True):  # fmt: skip
            out[f"single_transformer_blocks.{i}.{name}.weight"] = w
            out[f"single_transformer_blocks.{i}.{name}.bias"] = b
    return out


def clip(state: State, role: str, projection: bool) -> Any:
    """A CLIP text encoder (``role`` ``clip_l`` / ``clip_g``) from a transformers-layout state dict."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    shapes = shapes_of(state)
    config = CLIPTextConfig(**clip_config(shapes, role))
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    from accelerate import init_empty_weights

    with init_empty_weights():
        wrapped = any(k.startswith("text_model.") for k in cls(config).state_dict())
    skip = ("text_projection", "logit")
    body = {k.removeprefix("text_model."): v for k, v in state.items() if not k.startswith(skip)}
    body = {k: v for k, v in body.items() if not k.endswith("position_ids")}
    weights = {f"text_model.{k}" if wrapped else k: v for k, v in body.items()}
    if projection:
        import torch

        # SD3 files store CLIP-L without its projection, which SD3 uses as the identity (diffusers does the same).
        weights["text_projection.weight"] = state.get("text_projection.weight", torch.eye(config.hidden_size))
    return _assign(cls, config, weights, f"the {role} text encoder")


def t5(state: State) -> Any:
    from transformers import T5Config, T5EncoderModel

    weights = {k: v for k, v in state.items() if not k.startswith("decoder.") and k != "lm_head.weight"}
    # The encoder's embedding is ``shared`` (tied): files hold either name or both; the module takes one tensor.
    shared = weights.get("shared.weight", weights.get("encoder.embed_tokens.weight"))
    if shared is not None:
        weights["shared.weight"] = weights["encoder.embed_tokens.weight"] = shared
    config = T5Config(**t5_config(shapes_of(weights)))
    return _assign(T5EncoderModel, config, weights, "the T5 text encoder")


def vae(state: State, family: FlowFamily) -> Any:
    """The 16-channel VAE from its original (LDM) layout (``ae.safetensors``) or diffusers' layout."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if any(k.startswith("encoder.down_blocks.") for k in state):
        raise ModelError("diffusers-layout VAE files are not supported here", "pass the VAE's folder instead")
    config = vae_config(shapes_of(state), family)
    return _assign(AutoencoderKL, config, convert_ldm_vae_checkpoint(dict(state), config), "the VAE")
