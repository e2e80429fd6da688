"""GGUF transformer files (city96 / ComfyUI-GGUF layout): detected without the gguf package, loaded quantised
through diffusers' GGUF loader, and the same pixels as diffusers and as the dequantised weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.app import api
from difftool.core.errors import ModelError
from difftool.plugins.builtin.flow import gguf_files
from difftool.plugins.builtin.flow.loader import is_flow_model, load_flow_model
from difftool.plugins.builtin.flow.tokenizers import clip_tokenizer, t5_tokenizer

from . import tiny

gguf = pytest.importorskip("gguf", reason="the optional gguf extra is not installed (pip install 'difftool[gguf]')")

SEED, STEPS, SIZE = 5, 3, (32, 24)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def ours(model: Path, **params: Any) -> Image.Image:
    run = {"prompt": "a red fox in snow", "width": SIZE[0], "height": SIZE[1], "steps": STEPS, "dtype": "fp32"}
    return api.run("generate", model=str(model), seed=SEED, **{**run, **params}).images[0]


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    parts = tiny.flux(seed=7)
    root = tmp_path_factory.mktemp("flux-gguf")
    comfy = tiny.save_flux_comfy(parts, root)  # companions in models/text_encoders and models/vae
    quantised = tiny.save_gguf(tiny.bfl_flux_keys(parts["transformer"].state_dict()),
                               root / "models" / "unet" / "flux1-tiny-Q8_0.gguf", "flux")  # fmt: skip
    tiny.save(tiny.dequantized(quantised), comfy)  # the same weights, dequantised, as a safetensors file
    return {"parts": parts, "gguf": quantised, "safetensors": comfy}


def test_gguf_files_are_detected_from_their_header(flux: dict, tmp_path: Path) -> None:
    assert is_flow_model(flux["gguf"]).name == "flux"
    shapes = gguf_files.read_shapes(flux["gguf"])
    assert shapes["img_in.weight"] == (64, 64)  # PyTorch order, though stored quantised
    assert shapes["double_blocks.0.img_attn.qkv.weight"] == (192, 64)
    other = tmp_path / "llama.gguf"
    other.write_bytes(b"not a gguf file at all")
    assert is_flow_model(other) is None


def test_flux_gguf_stays_quantised_and_matches_its_dequantised_weights(flux: dict) -> None:
    from diffusers.quantizers.gguf.utils import GGUFLinear

    model = load_flow_model(flux["gguf"], dtype=torch.float32)
    layer = model.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer, GGUFLinear) and layer.weight.dtype == torch.uint8  # Q8_0 blocks in memory
    assert model.sources["vae"] == "ae"  # companions found in the ComfyUI models/ folder
    image = ours(flux["gguf"], guidance_scale=3.5)
    assert np.asarray(image).std() > 1
    assert max_diff(image, ours(flux["safetensors"], guidance_scale=3.5)) <= 2
    low = api.run("generate", model=str(flux["gguf"]), seed=SEED, prompt="a red fox in snow", width=SIZE[0],
                  height=SIZE[1], steps=STEPS, dtype="fp32", guidance_scale=3.5,
                  backend_options={"offload": "model"}).images[0]  # fmt: skip
    assert max_diff(image, low) == 0  # the low-memory mode changes no pixel of a quantised model either


def test_flux_gguf_matches_flux_pipeline(flux: dict) -> None:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    # diffusers' Flux conversion assumes Flux.1's 3072 width, so its pipeline gets the dequantised weights.
    parts = dict(flux["parts"])
    transformer = FluxTransformer2DModel.from_config(parts["transformer"].config)
    ours_model = load_flow_model(flux["safetensors"])
    transformer.load_state_dict(ours_model.transformer.state_dict())
    pipe = FluxPipeline(**{**parts, "transformer": transformer}, tokenizer=clip_tokenizer("clip_l"),
                        tokenizer_2=t5_tokenizer())  # fmt: skip
    reference = pipe("a red fox in snow", width=SIZE[0], height=SIZE[1], num_inference_steps=STEPS,
                     guidance_scale=3.5, generator=torch.Generator().manual_seed(SEED)).images[0]  # fmt: skip
    assert max_diff(ours(flux["gguf"], guidance_scale=3.5), reference) <= 2


def test_sd3_gguf_matches_diffusers_gguf_loader(tmp_path: Path) -> None:
    from diffusers import GGUFQuantizationConfig, SD3Transformer2DModel, StableDiffusion3Pipeline

    parts = tiny.sd3(seed=2)
    with torch.no_grad():  # SD3 files keep CLIP-L without its projection: the identity
        parts["text_encoder"].text_projection.weight.copy_(torch.eye(32))
    folder = tiny.save_folder(parts, tmp_path / "sd3-folder")
    transformer = parts["transformer"]
    stability = tiny.sd3_keys(transformer.state_dict(), transformer.config.num_layers)
    quantised = tiny.save_gguf(stability, tmp_path / "sd3.5-tiny-Q8_0.gguf", "sd3")
    tiny.save(parts["text_encoder"].state_dict(), tmp_path / "clip_l.safetensors")
    tiny.save(parts["text_encoder_2"].state_dict(), tmp_path / "clip_g.safetensors")
    tiny.save(parts["text_encoder_3"].state_dict(), tmp_path / "t5xxl_fp16.safetensors")
    tiny.save(tiny.ldm_vae_keys(parts["vae"].state_dict()), tmp_path / "sd3_vae.safetensors")
    assert is_flow_model(quantised).name == "sd3"

    theirs = SD3Transformer2DModel.from_single_file(
        str(quantised), config=str(folder), subfolder="transformer", local_files_only=True,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), torch_dtype=torch.float32,
    )  # fmt: skip
    tokenizers = {"tokenizer": clip_tokenizer("clip_l"), "tokenizer_2": clip_tokenizer("clip_g")}
    pipe = StableDiffusion3Pipeline(**{**parts, "transformer": theirs}, **tokenizers, tokenizer_3=t5_tokenizer())
    reference = pipe("a red fox in snow", negative_prompt="blurry", width=SIZE[0], height=SIZE[1],
                     num_inference_steps=STEPS, guidance_scale=5.0, generator=torch.Generator().manual_seed(SEED),
                     max_sequence_length=256).images[0]  # fmt: skip
    image = ours(quantised, guidance_scale=5.0, negative_prompt="blurry")
    assert np.asarray(image).std() > 1 and max_diff(image, reference) <= 2


def test_without_the_gguf_package_loading_says_how_to_install_it(flux: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    assert is_flow_model(flux["gguf"]).name == "flux"  # detection reads the header itself
    with pytest.raises(ModelError, match="gguf package is not installed") as error:
        load_flow_model(flux["gguf"])
    assert "difftool[gguf]" in error.value.fix


def test_models_lists_gguf_files_in_comfyui_unet_folders(flux: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from difftool.plugins.registry import build_registry

    monkeypatch.setenv("DIFFTOOL_MODELS", str(flux["gguf"].parents[2]))
    listed = {e.name: e.family for e in build_registry(entry_points=False).find_models()}
    assert listed["flux1-tiny-Q8_0"] == "flux"
    image = ours(Path("flux1-tiny-Q8_0"), guidance_scale=3.5)  # found by its listed name
    assert max_diff(image, ours(flux["gguf"], guidance_scale=3.5)) == 0
