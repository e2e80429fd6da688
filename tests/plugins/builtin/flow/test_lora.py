"""LoRAs for Flux and SD3 through ``--lora`` and ``<lora:NAME:W>``: parity with diffusers' load_lora_weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.app import api
from difftool.core.errors import ModelError
from difftool.plugins.builtin.flow.tokenizers import clip_tokenizer, t5_tokenizer

from . import tiny

SEED, STEPS, SIZE, PROMPT = 5, 3, (32, 24), "a red fox in snow"


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def ours(model: Path, prompt: str = PROMPT, **params: Any) -> Image.Image:
    run = {"width": SIZE[0], "height": SIZE[1], "steps": STEPS, "dtype": "fp32", **params}
    return api.run("generate", model=str(model), seed=SEED, prompt=prompt, **run).images[0]


def lora_pair(rows: int, columns: int, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    down = torch.randn(rank, columns, generator=generator) * 0.3
    return down, torch.randn(rows, rank, generator=generator) * 0.3


def peft_lora(modules: dict[str, tuple[int, int]], path: Path, seed: int) -> Path:
    """diffusers / peft layout: ``transformer.<module>.lora_A.weight`` and ``lora_B.weight``."""
    generator, state = torch.Generator().manual_seed(seed), {}
    for name, (rows, columns) in modules.items():
        a, b = lora_pair(rows, columns, 4, generator)
        state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"] = a, b
    return tiny.save(state, path)


def kohya_flux_lora(path: Path, seed: int) -> Path:
    """kohya / sd-scripts layout (BFL module names, ``lora_down`` / ``lora_up`` / ``alpha``), CLIP-L included."""
    generator, state = torch.Generator().manual_seed(seed), {}
    modules = {"lora_unet_double_blocks_0_img_attn_qkv": (192, 64), "lora_unet_double_blocks_0_txt_mlp_0": (256, 64),
               "lora_unet_single_blocks_1_linear2": (64, 320),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
               "lora_te1_text_model_encoder_layers_0_self_attn_out_proj": (32, 32)}  # fmt: skip
    for name, (rows, columns) in modules.items():
        down, up = lora_pair(rows, columns, 4, generator)
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)}
    return tiny.save(state, path)


def diffusers_image(pipe: Any, lora: Path, weight: float, **call: Any) -> Image.Image:
    pipe.load_lora_weights(str(lora), adapter_name="test")
    pipe.set_adapters("test", weight)
    generator = torch.Generator().manual_seed(SEED)
    return pipe(PROMPT, width=SIZE[0], height=SIZE[1], num_inference_steps=STEPS, generator=generator, **call).images[0]


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    parts = tiny.flux(seed=13)
    root = tmp_path_factory.mktemp("flux-lora")
    return {"parts": parts, "root": root, "model": tiny.save_flux_comfy(parts, root)}


def flux_pipeline(parts: dict[str, Any]) -> Any:
    from diffusers import FluxPipeline

    return FluxPipeline(**copy.deepcopy(parts), tokenizer=clip_tokenizer("clip_l"), tokenizer_2=t5_tokenizer())


def test_flux_peft_lora_matches_load_lora_weights(flux: dict) -> None:
    lora = peft_lora({"transformer_blocks.0.attn.to_q": (64, 64), "single_transformer_blocks.0.proj_out": (64, 320)},
                     flux["root"] / "style.safetensors", seed=1)  # fmt: skip
    image = ours(flux["model"], guidance_scale=3.5, lora=f"{lora}:0.8")
    assert max_diff(image, ours(flux["model"], guidance_scale=3.5)) > 2  # the LoRA changed the image
    reference = diffusers_image(flux_pipeline(flux["parts"]), lora, 0.8, guidance_scale=3.5)
    assert max_diff(image, reference) <= 2


def test_flux_kohya_lora_from_a_prompt_tag_matches_load_lora_weights(flux: dict, monkeypatch) -> None:
    folder = flux["root"] / "models" / "Lora"
    lora = kohya_flux_lora(folder / "ink.safetensors", seed=2)
    monkeypatch.setenv("DIFFTOOL_MODELS", str(flux["root"]))
    result = api.run("generate", model=str(flux["model"]), seed=SEED, prompt=PROMPT + " <lora:ink:0.7>",
                     width=SIZE[0], height=SIZE[1], steps=STEPS, dtype="fp32", guidance_scale=3.5)  # fmt: skip
    assert result.record["loras"] == ["ink:0.7"]
    reference = diffusers_image(flux_pipeline(flux["parts"]), lora, 0.7, guidance_scale=3.5)
    assert max_diff(result.images[0], reference) <= 2  # the tag left the prompt; the text encoder took its part


def test_sd3_lora_matches_load_lora_weights(tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    parts = tiny.sd3(seed=4)
    with torch.no_grad():  # SD3 files keep CLIP-L without its projection: the identity
        parts["text_encoder"].text_projection.weight.copy_(torch.eye(32))
    model = tiny.save_sd3_all_in_one(parts, tmp_path / "sd3.5-tiny.safetensors")
    lora = peft_lora({"transformer_blocks.0.attn.to_q": (32, 32), "transformer_blocks.1.ff.net.2": (32, 128)},
                     tmp_path / "sd3-style.safetensors", seed=3)  # fmt: skip
    image = ours(model, guidance_scale=5.0, negative_prompt="blurry", lora=f"{lora}:1.2")
    tokenizers = {"tokenizer": clip_tokenizer("clip_l"), "tokenizer_2": clip_tokenizer("clip_g")}
    pipe = StableDiffusion3Pipeline(**copy.deepcopy(parts), **tokenizers, tokenizer_3=t5_tokenizer())
    reference = diffusers_image(pipe, lora, 1.2, negative_prompt="blurry", guidance_scale=5.0, max_sequence_length=256)
    assert max_diff(image, reference) <= 2
    assert max_diff(image, ours(model, guidance_scale=5.0, negative_prompt="blurry")) > 2


def test_a_lora_for_another_model_is_refused_in_one_line(flux: dict) -> None:
    lora = peft_lora({"down_blocks.0.attentions.0.proj_in": (32, 32)}, flux["root"] / "sd15.safetensors", seed=5)
    with pytest.raises(ModelError, match="does not fit|changes nothing"):
        ours(flux["model"], guidance_scale=3.5, lora=str(lora))


def test_sd3_kohya_lora_equals_its_deltas_merged_into_the_checkpoint(tmp_path: Path) -> None:
    """kohya SD3 LoRAs use Stability's module names: merged by hand into a Stability-layout checkpoint (whose
    conversion is diffusers' own: qkv split, adaLN halves swapped) they must give the same pixels."""
    parts = tiny.sd3(seed=8)
    plain = tiny.save_sd3_all_in_one(parts, tmp_path / "plain" / "sd3.5-tiny.safetensors")
    modules = {"lora_unet_joint_blocks_0_x_block_attn_qkv": "model.diffusion_model.joint_blocks.0.x_block.attn.qkv",
               "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1":
                   "model.diffusion_model.joint_blocks.1.context_block.adaLN_modulation.1",
               "lora_unet_joint_blocks_0_context_block_mlp_fc1":
                   "model.diffusion_model.joint_blocks.0.context_block.mlp.fc1",
               "lora_unet_final_layer_adaLN_modulation_1": "model.diffusion_model.final_layer.adaLN_modulation.1",
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
                   "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj",
               "lora_te2_text_model_encoder_layers_1_self_attn_v_proj":
                   "text_encoders.clip_g.transformer.text_model.encoder.layers.1.self_attn.v_proj"}  # fmt: skip
    from safetensors.torch import load_file

    merged = load_file(str(plain))
    generator, lora, weight = torch.Generator().manual_seed(9), {}, 0.9
    for name, target in modules.items():
        rows, columns = merged[f"{target}.weight"].shape
        down, up = lora_pair(rows, columns, 4, generator)
        lora |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)}
        merged[f"{target}.weight"] = merged[f"{target}.weight"] + weight * (2.0 / 4) * (up @ down)
    tiny.save(merged, tmp_path / "merged" / "sd3.5-tiny.safetensors")
    lora_file = tiny.save(lora, tmp_path / "sd3-kohya.safetensors")
    run = {"guidance_scale": 5.0, "negative_prompt": "blurry"}
    image = ours(plain, lora=f"{lora_file}:{weight}", **run)
    assert max_diff(image, ours(tmp_path / "merged" / "sd3.5-tiny.safetensors", **run)) <= 2
    assert max_diff(image, ours(plain, **run)) > 2
