"""Tiny random SD3 and Flux models, saved in the layouts people download.

``save_folder``: a diffusers folder. ``bfl_flux_keys`` / ``sd3_keys`` rename a diffusers transformer's
state dict to Black Forest Labs' / Stability's original layout (the inverse of diffusers'
``convert_*_transformer_checkpoint_to_diffusers``); ``ldm_vae_keys`` the VAE to the original layout
(``ae.safetensors``). Text encoders keep transformers' key names (ComfyUI's ``clip_l.safetensors``,
``t5xxl_fp16.safetensors``), under ``text_encoders.<name>.transformer.`` inside all-in-one files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FLUX_SCALING = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
SD3_SCALING = {"scaling_factor": 1.5305, "shift_factor": 0.0609}


def clip(role: str, seed: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=77,
        vocab_size=49408, hidden_act="quick_gelu" if role == "clip_l" else "gelu", projection_dim=32,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )  # fmt: skip
    cls = CLIPTextModel if role == "flux" else CLIPTextModelWithProjection
    if role == "flux":
        config.hidden_act = "quick_gelu"
    return cls(config).eval()


def t5(width: int, seed: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        d_model=width, d_ff=40, d_kv=8, num_heads=4, num_layers=2, vocab_size=32128, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def vae(scaling: dict[str, float], seed: int, levels: int = 2) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(32,) * levels, layers_per_block=1,
        latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False, **scaling,
    ).eval()  # fmt: skip


def _randomize(module: Any, seed: int) -> Any:
    """Zero-initialised layers (adaLN, output projections) would make every output the same: fill them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return module.eval()


def flux(guidance: bool = True, seed: int = 0) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 14, 14),
    )  # fmt: skip
    scheduler = {"num_train_timesteps": 1000, "shift": 3.0 if guidance else 1.0, "use_dynamic_shifting": guidance,
                 "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                 "max_image_seq_len": 4096}  # fmt: skip
    return {
        "transformer": _randomize(transformer, seed),
        "vae": vae(FLUX_SCALING, seed + 1),
        "text_encoder": clip("flux", seed + 2),
        "text_encoder_2": t5(32, seed + 3),
        "scheduler": FlowMatchEulerDiscreteScheduler(**scheduler),
    }


def flux_fill(seed: int = 0) -> dict[str, Any]:
    """Flux.1 Fill: the latents' 64 packed features, the masked image's 64 and the 8 x 8 pixel mask's 256 (384
    inputs, as the real model: the VAE downsamples 8 times, so it has 4 levels here), 64 outputs."""
    from diffusers import FluxTransformer2DModel

    parts = flux(seed=seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=384, out_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 14, 14),
    )  # fmt: skip
    return parts | {"transformer": _randomize(transformer, seed), "vae": vae(FLUX_SCALING, seed + 1, levels=4)}


def sd3(seed: int = 0, with_t5: bool = True) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,),
    )  # fmt: skip
    parts = {
        "transformer": _randomize(transformer, seed),
        "vae": vae(SD3_SCALING, seed + 1),
        "text_encoder": clip("clip_l", seed + 2),
        "text_encoder_2": clip("clip_g", seed + 3),
        "text_encoder_3": t5(64, seed + 4) if with_t5 else None,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    }
    return parts


def save_folder(parts: dict[str, Any], path: Path) -> Path:
    """A diffusers folder: each component in its sub-folder, no tokenizers (difftool's shipped ones serve)."""
    path.mkdir(parents=True, exist_ok=True)
    flux = type(parts["transformer"]).__name__.startswith("Flux")
    (path / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline" if flux else "StableDiffusion3Pipeline"})
    )
    for name, part in parts.items():
        if part is None:
            continue
        if name == "scheduler":
            (path / name).mkdir(exist_ok=True)
            (path / name / "scheduler_config.json").write_text(json.dumps(dict(part.config)))
        else:
            part.save_pretrained(path / name, safe_serialization=True)
    return path


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))  # untied copies
    return path


def _swap(weight: torch.Tensor) -> torch.Tensor:
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _qkv(state: dict[str, torch.Tensor], prefix: str, names: tuple[str, ...], kind: str) -> torch.Tensor:
    return torch.cat([state[f"{prefix}{n}.{kind}"] for n in names], dim=0)


def bfl_flux_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Flux transformer state dict in BFL's layout (``flux1-dev.safetensors``)."""
    renames = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
               "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
               "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
               "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
               "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
               "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}  # fmt: skip
    double = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
              "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
              "ff_context.net.2": "txt_mlp.2", "attn.to_out.0": "img_attn.proj",
              "attn.to_add_out": "txt_attn.proj"}  # fmt: skip
    norms = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
             "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
             "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
             "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"}  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "transformer_blocks":
            i, rest = parts[1], ".".join(parts[2:])
            p = f"transformer_blocks.{i}."
            if rest.startswith(("attn.to_q.", "attn.add_q_proj.")):
                kind = parts[-1]
                img = rest.startswith("attn.to_q.")
                names = ("attn.to_q", "attn.to_k", "attn.to_v") if img else (
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")  # fmt: skip
                out[f"double_blocks.{i}.{'img' if img else 'txt'}_attn.qkv.{kind}"] = _qkv(state, p, names, kind)
            elif rest in norms:
                out[f"double_blocks.{i}.{norms[rest]}"] = value
            elif not rest.startswith(("attn.to_k.", "attn.to_v.", "attn.add_k_proj.", "attn.add_v_proj.")):
                stem, kind = rest.rsplit(".", 1)
                out[f"double_blocks.{i}.{double[stem]}.{kind}"] = value
        elif parts[0] == "single_transformer_blocks":
            i, rest = parts[1], ".".join(parts[2:])
            p = f"single_transformer_blocks.{i}."
            if rest.startswith("attn.to_q."):
                kind = parts[-1]
                out[f"single_blocks.{i}.linear1.{kind}"] = _qkv(
                    state, p, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), kind)  # fmt: skip
            elif rest == "attn.norm_q.weight":
                out[f"single_blocks.{i}.norm.query_norm.scale"] = value
            elif rest == "attn.norm_k.weight":
                out[f"single_blocks.{i}.norm.key_norm.scale"] = value
            elif rest.startswith("norm.linear."):
                out[f"single_blocks.{i}.modulation.lin.{parts[-1]}"] = value
            elif rest.startswith("proj_out."):
                out[f"single_blocks.{i}.linear2.{parts[-1]}"] = value
        elif key.startswith("norm_out.linear."):
            out[f"final_layer.adaLN_modulation.1.{parts[-1]}"] = _swap(value)
        else:
            stem, kind = key.rsplit(".", 1)
            out[f"{renames[stem]}.{kind}"] = value
    return out


def sd3_keys(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A diffusers SD3 transformer state dict in Stability's layout (``model.diffusion_model.`` not added)."""
    renames = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
               "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
               "context_embedder": "context_embedder", "proj_out": "final_layer.linear"}  # fmt: skip
    block = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
             "attn2.to_out.0": "x_block.attn2.proj", "norm1.linear": "x_block.adaLN_modulation.1",
             "norm1_context.linear": "context_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1",
             "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
             "ff_context.net.2": "context_block.mlp.fc2", "attn.norm_q": "x_block.attn.ln_q",
             "attn.norm_k": "x_block.attn.ln_k", "attn.norm_added_q": "context_block.attn.ln_q",
             "attn.norm_added_k": "context_block.attn.ln_k", "attn2.norm_q": "x_block.attn2.ln_q",
             "attn2.norm_k": "x_block.attn2.ln_k"}  # fmt: skip
    fused = {"attn.to_q": ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
             "attn.add_q_proj": ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
             "attn2.to_q": ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v"))}  # fmt: skip
    skipped = ("attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.add_v_proj", "attn2.to_k", "attn2.to_v")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
            continue
        stem, kind = key.rsplit(".", 1)
        parts = stem.split(".")
        if parts[0] != "transformer_blocks":
            if stem == "norm_out.linear":
                out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap(value)
            else:
                out[f"{renames[stem]}.{kind}"] = value
            continue
        i, rest = int(parts[1]), ".".join(parts[2:])
        p = f"transformer_blocks.{i}."
        if rest in fused:
            name, names = fused[rest]
            out[f"joint_blocks.{i}.{name}.{kind}"] = _qkv(state, p, names, kind)
        elif rest not in skipped:
            last = i == num_layers - 1 and rest == "norm1_context.linear"
            out[f"joint_blocks.{i}.{block[rest]}.{kind}"] = _swap(value) if last else value
    return out


def ldm_vae_keys(state: dict[str, torch.Tensor], levels: int = 2) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict in the original layout (``ae.safetensors``: no prefix)."""
    out = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        parts = new.split(".")
        if parts[1] == "down_blocks":
            kind = "block" if parts[3] == "resnets" else "downsample"
            rest = parts[4:] if kind == "block" else parts[5:]
            new = f"{parts[0]}.down.{parts[2]}.{kind}.{'.'.join(rest)}"
        elif parts[1] == "up_blocks":
            kind = "block" if parts[3] == "resnets" else "upsample"
            rest = parts[4:] if kind == "block" else parts[5:]
            new = f"{parts[0]}.up.{levels - 1 - int(parts[2])}.{kind}.{'.'.join(rest)}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        elif parts[1] == "mid_block":
            names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
            rest = parts[4:] if parts[4] != "to_out" else parts[4:5] + parts[6:]
            new = f"{parts[0]}.mid.attn_1.{names[rest[0]]}.{'.'.join(rest[1:])}"
            if rest[0] != "group_norm" and rest[-1] == "weight":
                value = value.reshape(*value.shape, 1, 1)
        out[new] = value
    return out


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def save_flux_comfy(parts: dict[str, Any], root: Path, name: str = "flux1-tiny.safetensors") -> Path:
    """ComfyUI's layout: models/diffusion_models/<name>, models/text_encoders/{clip_l,t5xxl_fp16}, models/vae/ae."""
    models = root / "models"
    save(bfl_flux_keys(parts["transformer"].state_dict()), models / "diffusion_models" / name)
    save(parts["text_encoder"].state_dict(), models / "text_encoders" / "clip_l.safetensors")
    save(parts["text_encoder_2"].state_dict(), models / "text_encoders" / "t5xxl_fp16.safetensors")
    levels = len(parts["vae"].config.block_out_channels)
    save(ldm_vae_keys(parts["vae"].state_dict(), levels), models / "vae" / "ae.safetensors")
    return models / "diffusion_models" / name


def save_sd3_all_in_one(parts: dict[str, Any], path: Path) -> Path:
    """Stability's SD 3.5 all-in-one layout: transformer, VAE and the three text encoders in one file."""
    transformer = parts["transformer"]
    state = prefixed(sd3_keys(transformer.state_dict(), transformer.config.num_layers), "model.diffusion_model.")
    state |= prefixed(ldm_vae_keys(parts["vae"].state_dict()), "first_stage_model.")
    clip_l = {k: v for k, v in parts["text_encoder"].state_dict().items() if k != "text_projection.weight"}
    state |= prefixed(clip_l, "text_encoders.clip_l.transformer.")
    state |= prefixed(parts["text_encoder_2"].state_dict(), "text_encoders.clip_g.transformer.")
    if parts.get("text_encoder_3") is not None:
        state |= prefixed(parts["text_encoder_3"].state_dict(), "text_encoders.t5xxl.transformer.")
    return save(state, path)


def save_gguf(state: dict[str, torch.Tensor], path: Path, arch: str, quant: str = "Q8_0") -> Path:
    """A GGUF file as city96's convert.py (ComfyUI-GGUF) writes one: original key names, matrices quantised
    to ``quant``, vectors, small and 4-D tensors kept in F32."""
    import gguf

    qtype = gguf.GGMLQuantizationType[quant]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, tensor in state.items():
        data = tensor.detach().float().numpy()
        if data.ndim == 2 and data.shape[1] % block == 0:
            writer.add_tensor(key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(key, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    """A GGUF file's tensors dequantised to float32 (the same weights the quantised model computes with)."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    state = load_gguf_checkpoint(str(path))
    return {k: (dequantize_gguf_tensor(v) if isinstance(v, GGUFParameter) else v).float() for k, v in state.items()}
