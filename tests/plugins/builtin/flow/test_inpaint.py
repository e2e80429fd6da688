"""``inpaint`` for the flow families: parity with FluxFillPipeline, StableDiffusion3InpaintPipeline and
FluxInpaintPipeline inside the mask, the input's exact bytes outside it, and the SD path's mask handling."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.app import api
from difftool.plugins.builtin.flow.tokenizers import clip_tokenizer, t5_tokenizer

from . import tiny

SEED, STEPS, PROMPT = 9, 4, "a red door"


def photo(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x / size[0], y / size[1], 0.5 + 0.2 * np.sin(x / 5)], axis=-1) * 255
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def hole(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = np.zeros((size[1], size[0]), np.uint8)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask)


def ours(model: Path, image: Image.Image, mask: Image.Image, **params: Any) -> api.RunResult:
    run = {"prompt": PROMPT, "steps": STEPS, "dtype": "fp32", **params}
    return api.run("inpaint", image, model=str(model), mask=mask, seed=SEED, **run)


def check(result: Image.Image, reference: Image.Image, source: Image.Image, mask: Image.Image) -> int:
    """Inside the mask: the reference pipeline's pixels (returns the largest difference); outside: the input's."""
    inside = np.asarray(mask) > 0
    px, ref, src = (np.asarray(im.convert("RGB"), dtype=np.int16) for im in (result, reference, source))
    assert np.array_equal(px[~inside], src[~inside])
    assert np.abs(px[inside] - src[inside]).mean() > 5  # the hole really was repainted
    diff = int(np.abs(px[inside] - ref[inside]).max())
    print(f"max difference inside the mask: {diff}/255")
    return diff


@pytest.fixture(scope="module")
def fill(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    parts = tiny.flux_fill(seed=31)
    return parts, tiny.save_flux_comfy(parts, tmp_path_factory.mktemp("fill"), "flux1-fill-tiny.safetensors")


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_flux_fill_matches_flux_fill_pipeline(fill: tuple[dict[str, Any], Path], strength: float) -> None:
    from diffusers import FluxFillPipeline

    parts, model = fill
    size = (48, 32)
    source, mask = photo(size), hole(size, (8, 24, 16, 40))
    result = ours(model, source, mask, guidance_scale=30.0, strength=strength)
    assert result.record["model_family"] == "flux-fill" and result.record["distilled_guidance"] == 30.0
    pipe = FluxFillPipeline(**copy.deepcopy(parts), tokenizer=clip_tokenizer("clip_l"), tokenizer_2=t5_tokenizer())
    reference = pipe(PROMPT, image=source, mask_image=mask, width=48, height=32, strength=strength,
                     num_inference_steps=STEPS, guidance_scale=30.0,
                     generator=torch.Generator().manual_seed(SEED)).images[0]  # fmt: skip
    assert check(result.images[0], reference, source, mask) <= 2


def test_sd3_inpaint_matches_sd3_inpaint_pipeline(tmp_path: Path) -> None:
    from diffusers import StableDiffusion3InpaintPipeline

    parts = tiny.sd3(seed=32)
    with torch.no_grad():  # SD3 files keep CLIP-L without its projection: the identity
        parts["text_encoder"].text_projection.weight.copy_(torch.eye(32))
    model = tiny.save_sd3_all_in_one(parts, tmp_path / "sd3.5-tiny.safetensors")
    size = (32, 24)
    source, mask = photo(size), hole(size, (4, 16, 8, 24))
    result = ours(model, source, mask, guidance_scale=5.0, negative_prompt="blurry", strength=0.8).images[0]
    tokenizers = {"tokenizer": clip_tokenizer("clip_l"), "tokenizer_2": clip_tokenizer("clip_g")}
    pipe = StableDiffusion3InpaintPipeline(**copy.deepcopy(parts), **tokenizers, tokenizer_3=t5_tokenizer())
    latents = pipe(PROMPT, negative_prompt="blurry", image=source, mask_image=mask, strength=0.8, width=32,
                   height=24, num_inference_steps=STEPS, guidance_scale=5.0, max_sequence_length=256,
                   output_type="latent", generator=torch.Generator().manual_seed(SEED)).images  # fmt: skip
    # The pipeline decodes without the VAE's shift factor (its img2img and txt2img siblings add it): decode as
    # they do, which is what difftool does.
    vae = pipe.vae
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    reference = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
    assert check(result, reference, source, mask) <= 2


def test_flux_dev_inpaint_matches_flux_inpaint_pipeline(tmp_path: Path) -> None:
    from diffusers import FluxInpaintPipeline

    parts = tiny.flux(seed=33)
    model = tiny.save_flux_comfy(parts, tmp_path)
    size = (32, 24)
    source, mask = photo(size), hole(size, (4, 16, 8, 24))
    result = ours(model, source, mask, guidance_scale=3.5, strength=0.7).images[0]
    pipe = FluxInpaintPipeline(**copy.deepcopy(parts), tokenizer=clip_tokenizer("clip_l"), tokenizer_2=t5_tokenizer())
    reference = pipe(PROMPT, image=source, mask_image=mask, width=32, height=24, strength=0.7,
                     num_inference_steps=STEPS, guidance_scale=3.5,
                     generator=torch.Generator().manual_seed(SEED)).images[0]  # fmt: skip
    assert check(result, reference, source, mask) <= 2


def test_fill_pads_odd_sizes_extends_and_skips_an_empty_mask(fill: tuple[dict[str, Any], Path]) -> None:
    _, model = fill
    size = (40, 28)  # not multiples of 16: padded with edge pixels, cropped back
    source, mask = photo(size), hole(size, (6, 18, 10, 26))
    padded = ours(model, source, mask, guidance_scale=30.0, steps=1, feather=2).images[0]
    src, out = np.asarray(source, np.int16), np.asarray(padded, np.int16)
    assert padded.size == size
    assert np.array_equal(out[:3], src[:3]) and np.array_equal(out[:, -10:], src[:, -10:])  # beyond the feather
    assert np.abs(out[6:18, 10:26] - src[6:18, 10:26]).mean() > 5
    grown = ours(model, source, None, extend="8,0,0,4", guidance_scale=30.0, steps=1).images[0]
    assert grown.size == (48, 32)
    assert np.array_equal(np.asarray(grown, np.int16)[:28, 8:], src)
    empty = ours(model, source, hole(size, (0, 0, 0, 0)), steps=1).images[0]
    assert np.array_equal(np.asarray(empty, np.int16), src)


def test_only_masked_repaints_a_crop_at_the_native_size(
    fill: tuple[dict[str, Any], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from difftool.core.runtime import current
    from difftool.plugins.builtin.flow import families

    # A native size of 32 px (Flux's is 1024) keeps the tiny model fast: the 12 x 16 crop (+ 2 px) is worked on
    # at 32 x 24 and scaled back.
    monkeypatch.setitem(families.FAMILIES, "flux-fill", dataclasses.replace(families.FAMILIES["flux-fill"],
                                                                            native_size=32))  # fmt: skip
    current().cache("flow-models", dict).clear()  # the model is loaded again, with the patched family
    _, model = fill
    size = (40, 28)
    source, mask = photo(size), hole(size, (6, 18, 10, 26))
    try:
        result = ours(model, source, mask, only_masked=True, context=2, guidance_scale=30.0, steps=1).images[0]
    finally:
        current().cache("flow-models", dict).clear()
    src, out = np.asarray(source, np.int16), np.asarray(result, np.int16)
    assert result.size == size and np.array_equal(out[:6], src[:6]) and np.array_equal(out[:, 26:], src[:, 26:])
    assert np.abs(out[6:18, 10:26] - src[6:18, 10:26]).mean() > 5
