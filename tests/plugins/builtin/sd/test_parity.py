"""difftool's generate / style / inpaint equal diffusers' reference pipelines on the same tiny weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.app import api
from difftool.plugins.builtin.schedulers import BUILTIN_SCHEDULERS

from . import tiny

SCHEDULERS = ("ddim", "euler-a", "dpmpp-2m-karras")
SEED = 3
STEPS = 4


def reference_scheduler(name: str) -> Any:
    import diffusers

    factory = BUILTIN_SCHEDULERS[name][1]
    return getattr(diffusers, factory.class_name).from_config({**tiny.SCHEDULER_CONFIG, **factory.overrides})


def generator() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(SEED)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.fixture(scope="module")
def sd_parts() -> dict[str, Any]:
    return tiny.components()


@pytest.fixture(scope="module")
def sd_folder(sd_parts: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_folder(sd_parts, tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def inpaint_parts() -> dict[str, Any]:
    return tiny.components(in_channels=9, seed=1)


@pytest.fixture(scope="module")
def inpaint_folder(inpaint_parts: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_folder(inpaint_parts, tmp_path_factory.mktemp("sd") / "tiny-sd-inpaint")


def photo(size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x / size[0], y / size[1], 0.5 + 0.2 * np.sin(x / 5)], axis=-1) * 255
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def hole_mask(size: tuple[int, int] = (64, 48)) -> Image.Image:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[12:36, 20:52] = 255
    return Image.fromarray(mask)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_generate_matches_stable_diffusion_pipeline(scheduler: str, sd_parts: dict, sd_folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    ours = api.run(
        "generate",
        model=str(sd_folder),
        prompt="a watercolor fox",
        negative_prompt="blurry",
        width=64,
        height=48,
        steps=STEPS,
        guidance_scale=6.0,
        scheduler=scheduler,
        seed=SEED,
        dtype="fp32",
    ).images[0]
    pipe = StableDiffusionPipeline(
        **{**sd_parts, "scheduler": reference_scheduler(scheduler)},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ref = pipe(
        "a watercolor fox",
        negative_prompt="blurry",
        width=64,
        height=48,
        num_inference_steps=STEPS,
        guidance_scale=6.0,
        generator=generator(),
    ).images[0]
    assert np.asarray(ours).std() > 1  # a real image, not a constant
    assert max_diff(ours, ref) <= 1


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_style_matches_img2img_pipeline(scheduler: str, sd_parts: dict, sd_folder: Path) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    source = photo()
    ours = api.run(
        "style",
        source,
        model=str(sd_folder),
        prompt="an ink drawing",
        strength=0.6,
        steps=5,
        guidance_scale=5.0,
        scheduler=scheduler,
        seed=SEED,
        dtype="fp32",
    )
    pipe = StableDiffusionImg2ImgPipeline(
        **{**sd_parts, "scheduler": reference_scheduler(scheduler)},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ref = pipe(
        "an ink drawing",
        image=source,
        negative_prompt="",
        strength=0.6,
        num_inference_steps=5,
        guidance_scale=5.0,
        generator=generator(),
    ).images[0]
    assert ours.images[0].size == source.size
    assert max_diff(ours.images[0], ref) <= 1
    assert ours.record["strength"] == 0.6


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("nine_channel", [True, False], ids=["inpainting-model", "base-model"])
def test_inpaint_matches_inpaint_pipeline(scheduler: str, nine_channel: bool, request: pytest.FixtureRequest) -> None:
    from diffusers import StableDiffusionInpaintPipeline

    parts = request.getfixturevalue("inpaint_parts" if nine_channel else "sd_parts")
    folder = request.getfixturevalue("inpaint_folder" if nine_channel else "sd_folder")
    source, mask = photo(), hole_mask()
    ours = api.run(
        "inpaint",
        source,
        model=str(folder),
        mask=mask,
        prompt="a red door",
        steps=STEPS,
        guidance_scale=7.5,
        scheduler=scheduler,
        seed=SEED,
        dtype="fp32",
    ).images[0]
    pipe = StableDiffusionInpaintPipeline(
        **{**parts, "scheduler": reference_scheduler(scheduler)},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ref = pipe(
        "a red door",
        image=source,
        mask_image=mask,
        negative_prompt="",
        width=64,
        height=48,
        strength=1.0,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=generator(),
    ).images[0]
    inside = np.asarray(mask) > 0
    ours_px, ref_px, src_px = (np.asarray(im, dtype=np.int16) for im in (ours, ref, source))
    # Inside the mask: the reference pipeline's pixels. Outside: the input's exact bytes.
    assert np.abs(ours_px[inside] - ref_px[inside]).max() <= 1
    assert np.array_equal(ours_px[~inside], src_px[~inside])
    assert np.abs(ours_px[inside] - src_px[inside]).mean() > 5  # the hole really was repainted


@pytest.fixture(scope="module")
def xl_parts() -> dict[str, Any]:
    return tiny.components(xl=True, seed=2)


@pytest.fixture(scope="module")
def xl_folder(xl_parts: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_folder(xl_parts, tmp_path_factory.mktemp("sd") / "tiny-sdxl")


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_sdxl_generate_matches_sdxl_pipeline(scheduler: str, xl_parts: dict, xl_folder: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    ours = api.run(
        "generate",
        model=str(xl_folder),
        prompt="a glass teapot",
        negative_prompt="dust",
        width=48,
        height=32,
        steps=STEPS,
        guidance_scale=5.0,
        scheduler=scheduler,
        seed=SEED,
        dtype="fp32",
    )
    pipe = StableDiffusionXLPipeline(**{**xl_parts, "scheduler": reference_scheduler(scheduler)})
    ref = pipe(
        "a glass teapot",
        negative_prompt="dust",
        width=48,
        height=32,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=generator(),
    ).images[0]
    assert ours.record["model_family"] == "sdxl"
    assert max_diff(ours.images[0], ref) <= 1


def test_sdxl_style_matches_sdxl_img2img_pipeline(xl_parts: dict, xl_folder: Path) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    source = photo()
    ours = api.run(
        "style", source, model=str(xl_folder), prompt="pastel", strength=0.5, steps=6, seed=SEED, dtype="fp32",
        scheduler="euler-a", guidance_scale=4.0,
    )  # fmt: skip
    pipe = StableDiffusionXLImg2ImgPipeline(
        **{**xl_parts, "scheduler": reference_scheduler("euler-a")}, requires_aesthetics_score=False
    )
    ref = pipe(
        "pastel", image=source, negative_prompt="", strength=0.5, num_inference_steps=6, guidance_scale=4.0,
        generator=generator(),
    ).images[0]  # fmt: skip
    assert max_diff(ours.images[0], ref) <= 1


def test_sdxl_inpaint_matches_sdxl_inpaint_pipeline(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLInpaintPipeline

    parts = tiny.components(in_channels=9, xl=True, seed=8)
    folder = tiny.save_folder(parts, tmp_path / "tiny-sdxl-inpaint")
    source, mask = photo(), hole_mask()
    ours = api.run(
        "inpaint", source, model=str(folder), mask=mask, prompt="moss", steps=STEPS, seed=SEED, dtype="fp32",
        scheduler="dpmpp-2m-karras",
    ).images[0]  # fmt: skip
    pipe = StableDiffusionXLInpaintPipeline(
        **{**parts, "scheduler": reference_scheduler("dpmpp-2m-karras")}, requires_aesthetics_score=False
    )
    ref = pipe(
        "moss", image=source, mask_image=mask, negative_prompt="", width=64, height=48, strength=1.0,
        num_inference_steps=STEPS, guidance_scale=7.0, generator=generator(),
    ).images[0]  # fmt: skip
    inside = np.asarray(mask) > 0
    assert np.abs(np.asarray(ours, np.int16)[inside] - np.asarray(ref, np.int16)[inside]).max() <= 1
