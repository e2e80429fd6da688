"""Tiny random-weight Stable Diffusion components for tests, saved in real formats and key layouts.

``ldm_*_keys`` rename diffusers state dicts to the original (LDM / A1111) single-file layout; the
tests check the renaming by loading the file back through diffusers' own converter.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from difftool.plugins.builtin.sd.tokenizer import clip_tokenizer

SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def unet_config(in_channels: int = 4, xl: bool = False, sd2: bool = False, refiner: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = dict(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if xl else 8,
        norm_num_groups=32,
    )
    if sd2:
        config.update(use_linear_projection=True, attention_head_dim=(2, 4))
    if xl:
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            # 6 time ids + pooled text (text_encoder_2's projection); its width differs from text_encoder's,
            # which is how diffusers tells the two encoders of an SDXL single file apart.
            projection_class_embeddings_input_dim=8 * 6 + 32,
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            cross_attention_dim=32 + 48,  # the two text encoders' hidden states, concatenated
        )
    if refiner:  # text_encoder_2 only; 5 time ids (the aesthetic score replaces the target size)
        config.update(projection_class_embeddings_input_dim=8 * 5 + 32, cross_attention_dim=48)
    return config


VAE_CONFIG = dict(
    block_out_channels=(32, 64),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=32,
    layers_per_block=1,
    sample_size=32,
)


def vae_config(levels: int = 2) -> dict[str, Any]:
    if levels == 2:
        return VAE_CONFIG
    return {
        **VAE_CONFIG,
        "block_out_channels": (32,) * levels,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
    }


def text_config(projection: bool = False, hidden_size: int = 32) -> dict[str, Any]:
    return dict(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu" if projection else "quick_gelu",
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def components(
    in_channels: int = 4, xl: bool = False, seed: int = 0, sd2: bool = False, vae_levels: int = 2
) -> dict[str, Any]:
    """Random-weight components of a tiny SD 1.x-style (or SD 2.x-, SDXL-style) pipeline.

    ``vae_levels=4`` gives SD's 8x latent scale, which a ControlNet's conditioning encoder assumes.
    """
    return _components(in_channels, xl, seed, sd2, vae_levels)


def refiner_components(seed: int = 0, vae_levels: int = 2) -> dict[str, Any]:
    """A tiny SDXL refiner: SDXL-style U-Net on text_encoder_2 alone (48 wide), aesthetic-score time ids."""
    from diffusers import UNet2DConditionModel

    parts = _components(xl=True, seed=seed, vae_levels=vae_levels)
    del parts["text_encoder"], parts["tokenizer"]
    torch.manual_seed(seed + 1)
    parts["unet"] = UNet2DConditionModel(**unet_config(xl=True, refiner=True)).eval()
    return parts


def _components(
    in_channels: int = 4, xl: bool = False, seed: int = 0, sd2: bool = False, vae_levels: int = 2
) -> dict[str, Any]:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel(**unet_config(in_channels, xl, sd2)).eval(),
        "vae": AutoencoderKL(**vae_config(vae_levels)).eval(),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**text_config(projection=sd2))).eval(),
        "tokenizer": clip_tokenizer("openclip" if sd2 else "clip"),
        "scheduler": PNDMScheduler.from_config(SCHEDULER_CONFIG),
    }
    if xl:
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**text_config(True, 48))).eval()
        parts["tokenizer_2"] = clip_tokenizer("openclip")
    return parts


def save_folder(parts: dict[str, Any], path: Path) -> Path:
    """A diffusers pipeline folder (safetensors), as ``save_pretrained`` writes it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    if "text_encoder" not in parts:  # a refiner
        pipe = StableDiffusionXLImg2ImgPipeline(
            **parts, text_encoder=None, tokenizer=None, requires_aesthetics_score=True
        )
    elif "text_encoder_2" in parts:
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# --- the original single-file key layout -------------------------------------------------------


def _resnet(key: str) -> str:
    for new, old in (
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("time_emb_proj", "emb_layers.1"),
        ("conv_shortcut", "skip_connection"),
    ):
        key = key.replace(new + ".", old + ".")
    return key


def ldm_unet_keys(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    layers = config["layers_per_block"]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        head = ".".join(parts[:2]) if ".".join(parts[:2]) in fixed else parts[0]
        if head in fixed:
            new = fixed[head] + "." + key[len(head) + 1 :]
        elif parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{(layers + 1) * i + j + 1}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{(layers + 1) * i + j + 1}.1.{rest}"
            else:  # downsamplers.0.conv
                new = f"input_blocks.{(layers + 1) * (i + 1)}.0.op.{'.'.join(parts[5:])}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"output_blocks.{(layers + 1) * i + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{(layers + 1) * i + j}.1.{rest}"
            else:  # upsamplers.0.conv
                new = f"output_blocks.{(layers + 1) * i + layers}.{2 if up_attn[i] else 1}.{rest}"
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


def ldm_vae_keys(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    blocks = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        parts = new.split(".")
        if parts[1] == "down_blocks":
            i = int(parts[2])
            if parts[3] == "resnets":
                new = f"{parts[0]}.down.{i}.block.{'.'.join(parts[4:])}"
            else:
                new = f"{parts[0]}.down.{i}.downsample.{'.'.join(parts[5:])}"
        elif parts[1] == "up_blocks":
            i = blocks - 1 - int(parts[2])
            if parts[3] == "resnets":
                new = f"{parts[0]}.up.{i}.block.{'.'.join(parts[4:])}"
            else:
                new = f"{parts[0]}.up.{i}.upsample.{'.'.join(parts[5:])}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
            else:
                names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
                rest = parts[4:]
                if rest[0] == "to_out":
                    rest = rest[:1] + rest[2:]
                new = f"{parts[0]}.mid.attn_1.{names[rest[0]]}.{'.'.join(rest[1:])}"
                if rest[0] != "group_norm" and rest[-1] == "weight":
                    value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + new] = value
    return out


def ldm_clip_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIP ViT-L keys as SD 1.x files hold them (transformers >= 5.6 dropped the ``text_model.`` level)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def ldm_openclip_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower (SD 2.x, SDXL's second encoder) as the original files hold it."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    renames = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    out: dict[str, torch.Tensor] = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            for old, new in renames.items():
                out[f"{dst}{new}.{kind}"] = state[f"{src}{old}.{kind}"]
    return out


def save_single_file(parts: dict[str, Any], path: Path, with_sidecar: bool = True) -> Path:
    """A single-file checkpoint in the original key layout and, for tiny sizes, its sidecar configs.

    SD 1.x: ``cond_stage_model.transformer.``; SD 2.x: ``cond_stage_model.model.`` (OpenCLIP);
    SDXL: ``conditioner.embedders.0.transformer.`` and ``conditioner.embedders.1.model.``.
    """
    from safetensors.torch import save_file

    state = {
        **ldm_unet_keys(parts["unet"].state_dict(), dict(parts["unet"].config)),
        **ldm_vae_keys(parts["vae"].state_dict(), dict(parts["vae"].config)),
    }
    if "text_encoder" not in parts:  # an SDXL refiner: OpenCLIP-G alone, as the first embedder
        state.update(ldm_openclip_keys(parts["text_encoder_2"].state_dict(), "conditioner.embedders.0.model."))
    elif "text_encoder_2" in parts:
        text = parts["text_encoder"].state_dict()
        state.update(ldm_clip_keys(text, "conditioner.embedders.0.transformer."))
        state.update(ldm_openclip_keys(parts["text_encoder_2"].state_dict(), "conditioner.embedders.1.model."))
    elif parts["unet"].config.use_linear_projection:
        state.update(ldm_openclip_keys(parts["text_encoder"].state_dict(), "cond_stage_model.model."))
    else:
        state.update(ldm_clip_keys(parts["text_encoder"].state_dict(), "cond_stage_model.transformer."))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    if with_sidecar:
        sidecar = path.with_name(path.name + ".diffusers")
        names = [name for name in ("unet", "vae", "text_encoder", "text_encoder_2") if name in parts]
        for name in names:
            (sidecar / name).mkdir(parents=True, exist_ok=True)
            parts[name].config.to_json_file(sidecar / name / "config.json") if name.startswith("text") else (
                parts[name].save_config(sidecar / name)
            )
        (sidecar / "scheduler").mkdir(exist_ok=True)
        (sidecar / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    return path


# --- ControlNets ----------------------------------------------------------------------------------


def controlnet(unet: Any, seed: int = 0) -> Any:
    """A random ControlNet for ``unet``'s architecture, with SD's 8x conditioning encoder. diffusers
    zero-initialises its output convolutions (no effect until trained): they get random weights too."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    config = dict(unet.config)
    keep = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self", "in_channels"}
    net = ControlNetModel(in_channels=4, **{k: v for k, v in config.items() if k in keep}).eval()
    with torch.no_grad():
        for param in net.parameters():
            if not param.any():
                param.normal_(0, 0.2)
    return net


def ldm_controlnet_keys(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet state dict in the original (A1111 ``control_v11*``) key layout."""
    encoder, out = {}, {}
    for key, value in state.items():
        if key.startswith("controlnet_down_blocks."):
            index, rest = key.split(".")[1], key.split(".", 2)[2]
            out[f"zero_convs.{index}.0.{rest}"] = value
        elif key.startswith("controlnet_mid_block."):
            out["middle_block_out.0." + key.split(".", 1)[1]] = value
        elif key.startswith("controlnet_cond_embedding."):
            rest = key.removeprefix("controlnet_cond_embedding.")
            if rest.startswith("conv_in."):
                out["input_hint_block.0." + rest.split(".", 1)[1]] = value
            elif rest.startswith("conv_out."):
                out["input_hint_block.14." + rest.split(".", 1)[1]] = value
            else:  # blocks.J.weight
                j, kind = rest.split(".")[1:]
                out[f"input_hint_block.{2 * (int(j) + 1)}.{kind}"] = value
        else:
            encoder[key] = value
    unet_like = ldm_unet_keys(encoder, {**config, "up_block_types": ()})
    out.update({k.removeprefix("model.diffusion_model."): v for k, v in unet_like.items()})
    return out


def save_controlnet_file(net: Any, path: Path, original: bool = True, prefix: str = "") -> Path:
    """A single ``.safetensors`` ControlNet (original or diffusers key layout) with its sidecar config;
    ``prefix`` (``control_model.``) as some A1111 files carry it."""
    from safetensors.torch import save_file

    state = net.state_dict()
    if original:
        state = {prefix + k: v for k, v in ldm_controlnet_keys(state, dict(net.config)).items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    net.save_config(path.with_name(path.name + ".diffusers"))
    return path
