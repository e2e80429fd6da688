"""``style`` (img2img) for Flux and SD3: parity with FluxImg2ImgPipeline and StableDiffusion3Img2ImgPipeline;
``--scheduler`` for these families: flow schedulers as named, SD samplers refused."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.app import api
from difftool.core.errors import ParameterError
from difftool.plugins.builtin.flow.tokenizers import clip_tokenizer, t5_tokenizer

from . import tiny

SEED, STEPS, PROMPT = 6, 4, "an oil painting of a harbour"


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    y, x = np.mgrid[0:24, 0:32]
    rgb = np.stack([x * 8, y * 10, (x + y) * 4], axis=-1).clip(0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("img2img") / "photo.png"
    Image.fromarray(rgb).save(path)
    return path


def ours(model: Path, photo: Path, **params: Any) -> api.RunResult:
    run = {"prompt": PROMPT, "steps": STEPS, "strength": 0.6, "dtype": "fp32", **params}
    return api.run("style", str(photo), model=str(model), seed=SEED, **run)


def test_flux_style_matches_flux_img2img_pipeline(photo: Path, tmp_path: Path) -> None:
    from diffusers import FluxImg2ImgPipeline

    parts = tiny.flux(seed=21)
    model = tiny.save_flux_comfy(parts, tmp_path)
    result = ours(model, photo, guidance_scale=3.5)
    image = result.images[0]
    assert image.size == (32, 24) and result.record["strength"] == 0.6
    pipe = FluxImg2ImgPipeline(**copy.deepcopy(parts), tokenizer=clip_tokenizer("clip_l"), tokenizer_2=t5_tokenizer())
    reference = pipe(PROMPT, image=Image.open(photo), strength=0.6, num_inference_steps=STEPS, guidance_scale=3.5,
                     width=32, height=24, generator=torch.Generator().manual_seed(SEED)).images[0]  # fmt: skip
    assert max_diff(image, reference) <= 2
    weaker = ours(model, photo, guidance_scale=3.5, strength=0.3).images[0]  # one step of four: nearer the photo
    source = Image.open(photo).convert("RGB")
    assert max_diff(weaker, source) < max_diff(image, source)


def test_sd3_style_matches_sd3_img2img_pipeline_with_cfg(photo: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Img2ImgPipeline

    parts = tiny.sd3(seed=22)
    with torch.no_grad():  # SD3 files keep CLIP-L without its projection: the identity
        parts["text_encoder"].text_projection.weight.copy_(torch.eye(32))
    model = tiny.save_sd3_all_in_one(parts, tmp_path / "sd3.5-tiny.safetensors")
    image = ours(model, photo, guidance_scale=5.0, negative_prompt="blurry", strength=0.8).images[0]
    tokenizers = {"tokenizer": clip_tokenizer("clip_l"), "tokenizer_2": clip_tokenizer("clip_g")}
    pipe = StableDiffusion3Img2ImgPipeline(**copy.deepcopy(parts), **tokenizers, tokenizer_3=t5_tokenizer())
    reference = pipe(PROMPT, negative_prompt="blurry", image=Image.open(photo), strength=0.8,
                     num_inference_steps=STEPS, guidance_scale=5.0, max_sequence_length=256, width=32, height=24,
                     generator=torch.Generator().manual_seed(SEED)).images[0]  # fmt: skip
    assert np.asarray(image).std() > 1 and max_diff(image, reference) <= 2


def test_flow_models_take_flow_schedulers_and_refuse_sd_samplers(photo: Path, tmp_path: Path) -> None:
    model = tiny.save_flux_comfy(tiny.flux(seed=23), tmp_path)
    run = {"prompt": "x", "width": 32, "height": 32, "steps": 2, "dtype": "fp32", "guidance_scale": 3.5}
    default = api.run("generate", model=str(model), seed=1, **run)  # the declared SD default: flow-euler
    named = api.run("generate", model=str(model), seed=1, scheduler="flow-euler", **run)
    assert default.record["scheduler"] == named.record["scheduler"] == "flow-euler"
    assert max_diff(default.images[0], named.images[0]) == 0
    with pytest.raises(ParameterError, match="--scheduler euler-a is a Stable Diffusion sampler") as error:
        api.run("generate", model=str(model), seed=1, scheduler="euler-a", **run)
    assert "flow-euler" in error.value.fix
    with pytest.raises(ParameterError, match="Stable Diffusion sampler"):
        ours(model, photo, scheduler="ddim")
