"""generate --hires (A1111's hires fix): diffusers' txt2img (latents) + img2img composition, pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from difftool.app import api
from difftool.core.images import read_metadata, save_image
from difftool.plugins.builtin.sd.hires import target_size

from . import tiny
from .test_parity import max_diff, reference_scheduler


@pytest.fixture(scope="module")
def parts():
    return tiny.components(seed=8)


@pytest.fixture(scope="module")
def folder(parts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_folder(parts, tmp_path_factory.mktemp("sd") / "tiny")


def test_target_size_rounds_down_to_multiples_of_8() -> None:
    assert target_size((64, 48), 1.5) == (96, 72) and target_size((40, 24), 1.3) == (48, 24)


def test_latent_hires_equals_diffusers_txt2img_then_img2img(parts, folder: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    ours = api.run(
        "generate", model=str(folder), prompt="a lighthouse", width=32, height=24, steps=4, scheduler="ddim",
        hires=2.0, hires_steps=5, hires_strength=0.6, seed=3, dtype="fp32",
    )  # fmt: skip
    generator = torch.Generator("cpu").manual_seed(3)
    common = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    first = StableDiffusionPipeline(**{**parts, "scheduler": reference_scheduler("ddim")}, **common)
    latents = first(
        "a lighthouse", negative_prompt="", width=32, height=24, num_inference_steps=4, guidance_scale=7.0,
        generator=generator, output_type="latent",
    ).images  # fmt: skip
    size = (latents.shape[2] * 2, latents.shape[3] * 2)  # the tiny VAE scales by 2, not 8
    upscaled = torch.nn.functional.interpolate(latents, size=size, mode="bilinear", antialias=False)
    second = StableDiffusionImg2ImgPipeline(**{**parts, "scheduler": reference_scheduler("ddim")}, **common)
    reference = second(
        "a lighthouse", image=upscaled, negative_prompt="", strength=0.6, num_inference_steps=5, guidance_scale=7.0,
        generator=generator,
    ).images[0]  # fmt: skip
    assert ours.images[0].size == (64, 48) == reference.size
    assert max_diff(ours.images[0], reference) <= 1
    assert ours.record["size"] == "64x48" and ours.record["hires_upscaler"] == "latent"
    params = read_metadata(save_image(ours.images[0], tmp_path / "h.png", ours.record))["parameters"]
    assert params["Hires upscale"] == "2.0" and params["Hires steps"] == "5" and params["Denoising strength"] == "0.6"
    assert params["Hires upscaler"] == "latent" and params["Size"] == "64x48"


def test_hires_with_a_superres_model_upscales_the_decoded_image(folder: Path, superres_model: Path) -> None:
    common = {"model": str(folder), "prompt": "a lighthouse", "width": 32, "height": 24, "steps": 2, "seed": 3}
    plain = api.run("generate", hires=1.5, **common)
    modelled = api.run("generate", hires=1.5, hires_upscaler=str(superres_model), **common)
    assert modelled.images[0].size == (48, 32) == plain.images[0].size
    assert modelled.record["hires_upscaler"] == str(superres_model)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(modelled.images[0]))


def test_a_hires_pass_with_no_step_names_the_hires_options_before_the_first_pass(folder: Path) -> None:
    """Issue 29 item 20: the error said "raise --strength or --steps"; generate has no --strength. It now
    names --hires-strength and --hires-steps, and comes before the first pass runs."""
    from difftool.core.errors import ParameterError

    steps: list[int] = []
    with pytest.raises(
        ParameterError,
        match=r"^--hires-strength 0.05 with --hires-steps 10 leaves no step to run; raise --hires-strength or "
        r"--hires-steps$",
    ):
        api.run(
            "generate", model=str(folder), prompt="a lighthouse", width=32, height=24, steps=3, hires=2.0,
            hires_steps=10, hires_strength=0.05, seed=3, dtype="fp32", progress=lambda i, n, p: steps.append(i),
        )  # fmt: skip
    assert steps == []  # refused before the first pass
