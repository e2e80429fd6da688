"""``--hires`` for Flux: the first pass, its latents upscaled and refined, equals diffusers' FluxPipeline
(``output_type="latent"``) then FluxImg2ImgPipeline given those latents, with one generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from difftool.app import api
from difftool.plugins.builtin.flow.tokenizers import clip_tokenizer, t5_tokenizer

from . import tiny

SEED, STEPS, PROMPT = 7, 3, "a lighthouse at dusk"


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def test_flux_hires_matches_flux_then_flux_img2img_on_the_upscaled_latents(tmp_path: Path) -> None:
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    parts = tiny.flux(seed=11)
    folder = tiny.save_folder(parts, tmp_path / "flux")
    result = api.run("generate", model=str(folder), prompt=PROMPT, width=32, height=32, steps=STEPS, seed=SEED,
                     guidance_scale=3.5, hires=1.5, hires_strength=0.6, dtype="fp32")  # fmt: skip
    assert result.images[0].size == (48, 48) and result.record["hires_strength"] == 0.6
    assert "shift" not in result.record  # Flux dev's shift differs between the passes: no one value to record
    tokenizers = {"tokenizer": clip_tokenizer("clip_l"), "tokenizer_2": t5_tokenizer()}
    generator = torch.Generator().manual_seed(SEED)
    first = FluxPipeline(**parts, **tokenizers)
    packed = first(PROMPT, width=32, height=32, num_inference_steps=STEPS, guidance_scale=3.5,
                   generator=generator, output_type="latent").images  # fmt: skip
    latents = first._unpack_latents(packed, 32, 32, first.vae_scale_factor)
    cells = (48 // first.vae_scale_factor, 48 // first.vae_scale_factor)
    upscaled = torch.nn.functional.interpolate(latents, size=cells, mode="bilinear", antialias=False)
    second = FluxImg2ImgPipeline(**parts, **tokenizers)
    reference = second(PROMPT, image=upscaled, width=48, height=48, strength=0.6, num_inference_steps=STEPS,
                       guidance_scale=3.5, generator=generator).images[0]  # fmt: skip
    assert max_diff(result.images[0], reference) <= 2
    plain = api.run("generate", model=str(folder), prompt=PROMPT, width=48, height=48, steps=STEPS, seed=SEED,
                    guidance_scale=3.5, dtype="fp32")  # fmt: skip
    assert max_diff(result.images[0], plain.images[0]) > 2  # a second pass, not a plain run at the target size


def test_target_sizes_are_in_the_models_multiples() -> None:
    from difftool.plugins.builtin.flow.hires import target_size

    model = type("Model", (), {"vae_scale": 8})()
    assert target_size(model, (1024, 768), 1.5) == (1536, 1152) and target_size(model, (1000, 600), 1.3) == (1296, 768)


def test_upscale_sd_with_flux_repaints_each_tile_as_flux_img2img(tmp_path: Path) -> None:
    """One tile is exactly the family's img2img (``style``, which equals FluxImg2ImgPipeline) of that tile;
    a wider output runs in overlapping tiles padded to the model's multiples and blended back."""
    from PIL import Image

    folder = tiny.save_folder(tiny.flux(seed=12), tmp_path / "flux")
    rng = np.random.default_rng(0)
    source = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(source)
    common = {"model": str(folder), "prompt": PROMPT, "steps": STEPS, "seed": SEED, "guidance_scale": 3.5,
              "strength": 0.5, "dtype": "fp32"}  # fmt: skip
    tiled = api.run("upscale-sd", source, scale=1.0, upscaler="lanczos", **common)
    styled = api.run("style", source, **common)
    assert tiled.record["tiles"] == 1 and max_diff(tiled.images[0], styled.images[0]) <= 2
    wide = api.run("upscale-sd", source, scale=1.5, upscaler="lanczos", tile=24, overlap=8, **common)
    assert wide.images[0].size == (48, 48) and wide.record["tiles"] == 9  # 24 px tiles padded to 32 for Flux
    assert wide.record["model_family"] == "flux"
    from difftool.core.errors import ParameterError

    with pytest.raises(ParameterError, match="runs with generate and style, not upscale-sd"):
        api.run("upscale-sd", source, scale=1.0, upscaler="lanczos", reference=[source], **common)
