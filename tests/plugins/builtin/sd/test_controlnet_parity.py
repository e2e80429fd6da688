"""ControlNet runs equal diffusers' ControlNet pipelines on the same tiny weights (within 1/255)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from difftool.app import api

from . import tiny
from .test_parity import SEED, generator, max_diff, photo, reference_scheduler

STEPS = 4
SIZE = (64, 48)


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny SD 1.x model (8x VAE) as a folder, two ControlNets: an original-layout file and a folder."""
    root = tmp_path_factory.mktemp("cn")
    parts = tiny.components(vae_levels=4, seed=5)
    nets = [tiny.controlnet(parts["unet"], seed=6), tiny.controlnet(parts["unet"], seed=7)]
    nets[1].save_pretrained(root / "cn-folder", safe_serialization=True)
    return {
        "parts": parts,
        "folder": tiny.save_folder(parts, root / "tiny-sd"),
        "nets": nets,
        "files": [tiny.save_controlnet_file(nets[0], root / "cn-original.safetensors"), root / "cn-folder"],
    }


@pytest.fixture(scope="module")
def control_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "control.png"
    photo((80, 60)).save(path)  # another size than the output: resized as diffusers does
    return path


def sd_reference(sd: dict[str, Any], controlnet: Any, scheduler: str) -> Any:
    from diffusers import StableDiffusionControlNetPipeline

    return StableDiffusionControlNetPipeline(
        **{**sd["parts"], "scheduler": reference_scheduler(scheduler)},
        controlnet=controlnet,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def ours(folder: Path, control: list[Any], **params: Any) -> Any:
    defaults = dict(prompt="a lighthouse", negative_prompt="fog", steps=STEPS, guidance_scale=6.0, seed=SEED)
    return api.run("generate", model=str(folder), width=SIZE[0], height=SIZE[1], dtype="fp32", control=control,
                   **{**defaults, **params})  # fmt: skip


def reference_call(pipe: Any, image: Any, **kwargs: Any) -> Image.Image:
    return pipe(
        "a lighthouse", negative_prompt="fog", image=image, width=SIZE[0], height=SIZE[1], num_inference_steps=STEPS,
        guidance_scale=6.0, generator=generator(), **kwargs,
    ).images[0]  # fmt: skip


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m-karras"])
def test_single_controlnet_from_an_original_file_matches_diffusers(
    scheduler: str, sd: dict[str, Any], control_image: Path
) -> None:
    result = ours(sd["folder"], [f"{sd['files'][0]}={control_image},weight=0.8"], scheduler=scheduler)
    ref = reference_call(
        sd_reference(sd, sd["nets"][0], scheduler), Image.open(control_image), controlnet_conditioning_scale=0.8
    )
    plain = ours(sd["folder"], [], scheduler=scheduler).images[0]
    assert max_diff(result.images[0], plain) > 5  # the ControlNet changed the image
    assert max_diff(result.images[0], ref) <= 1
    assert result.record["control"] == [f"{sd['files'][0]}={control_image},pre=none,weight=0.8,start=0,end=1"]


def test_multi_controlnet_with_start_end_matches_diffusers(sd: dict[str, Any], control_image: Path) -> None:
    second = photo((64, 48)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    units = [
        {"model": str(sd["files"][0]), "image": str(control_image), "weight": 0.7, "end": 0.6},
        {"model": str(sd["files"][1]), "image": second, "weight": 1.2, "start": 0.25},
    ]
    result = ours(sd["folder"], units, scheduler="euler-a")
    pipe = sd_reference(sd, sd["nets"], "euler-a")  # a list: diffusers' MultiControlNetModel
    ref = reference_call(
        pipe, [Image.open(control_image), second], controlnet_conditioning_scale=[0.7, 1.2],
        control_guidance_start=[0.0, 0.25], control_guidance_end=[0.6, 1.0],
    )  # fmt: skip
    assert max_diff(result.images[0], ref) <= 1
    # The schedule matters: the same units acting on every step give another image.
    always = ours(sd["folder"], [{**units[0], "end": 1.0}, {**units[1], "start": 0.0}], scheduler="euler-a")
    assert max_diff(always.images[0], result.images[0]) > 2


def test_guess_mode_matches_diffusers(sd: dict[str, Any], control_image: Path) -> None:
    result = ours(sd["folder"], [f"{sd['files'][1]}={control_image},guess=1"], scheduler="ddim")
    ref = reference_call(sd_reference(sd, sd["nets"][1], "ddim"), Image.open(control_image), guess_mode=True)
    assert max_diff(result.images[0], ref) <= 1


def test_style_with_controlnet_matches_img2img_controlnet_pipeline(sd: dict[str, Any]) -> None:
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    source = photo(SIZE)
    result = api.run(
        "style", source, model=str(sd["folder"]), prompt="ink", strength=0.6, steps=5, guidance_scale=5.0,
        scheduler="ddim", seed=SEED, dtype="fp32", control=[f"{sd['files'][0]},weight=0.9"],  # no image: the input
    )  # fmt: skip
    pipe = StableDiffusionControlNetImg2ImgPipeline(
        **{**sd["parts"], "scheduler": reference_scheduler("ddim")}, controlnet=sd["nets"][0],
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    ref = pipe(
        "ink", image=source, control_image=source, negative_prompt="", strength=0.6, num_inference_steps=5,
        guidance_scale=5.0, controlnet_conditioning_scale=0.9, generator=generator(),
    ).images[0]  # fmt: skip
    assert max_diff(result.images[0], ref) <= 1


@pytest.mark.parametrize("layout", ["diffusers", "original", "control_model."])
def test_sdxl_controlnet_matches_sdxl_controlnet_pipeline(tmp_path: Path, control_image: Path, layout: str) -> None:
    """SDXL ControlNet files in diffusers' keys and in the original layout (its ``label_emb``, which
    diffusers' converter drops, mapped by difftool), with and without A1111's ``control_model.`` prefix."""
    from diffusers import StableDiffusionXLControlNetPipeline

    parts = tiny.components(xl=True, vae_levels=4, seed=9)
    folder = tiny.save_folder(parts, tmp_path / "tiny-sdxl")
    net = tiny.controlnet(parts["unet"], seed=10)
    original, prefix = layout != "diffusers", layout if layout.endswith(".") else ""
    file = tiny.save_controlnet_file(net, tmp_path / "cn-xl.safetensors", original=original, prefix=prefix)
    result = api.run(
        "generate", model=str(folder), prompt="a teapot", negative_prompt="dust", width=SIZE[0], height=SIZE[1],
        steps=STEPS, guidance_scale=5.0, scheduler="euler-a", seed=SEED, dtype="fp32",
        control=[f"{file}={control_image},weight=0.9,start=0.2"],
    )  # fmt: skip
    pipe = StableDiffusionXLControlNetPipeline(**{**parts, "scheduler": reference_scheduler("euler-a")}, controlnet=net)
    ref = pipe(
        "a teapot", negative_prompt="dust", image=Image.open(control_image), width=SIZE[0], height=SIZE[1],
        num_inference_steps=STEPS, guidance_scale=5.0, controlnet_conditioning_scale=0.9, control_guidance_start=0.2,
        generator=generator(),
    ).images[0]  # fmt: skip
    assert result.record["model_family"] == "sdxl"
    assert max_diff(result.images[0], ref) <= 1
    assert result.record["controlnet"][0].startswith("Module: none, Model: cn-xl [")


def test_inpaint_with_the_inpaint_preprocessor_changes_only_the_hole(sd: dict[str, Any]) -> None:
    from .test_parity import hole_mask

    source, mask = photo(SIZE), hole_mask(SIZE)
    common = dict(model=str(sd["folder"]), mask=mask, prompt="a door", steps=STEPS, seed=SEED, dtype="fp32")
    controlled = api.run("inpaint", source, control=[f"{sd['files'][0]},pre=inpaint"], **common).images[0]
    plain = api.run("inpaint", source, **common).images[0]
    inside = np.asarray(mask) > 0
    a, b = np.asarray(controlled, np.int16), np.asarray(plain, np.int16)
    assert np.abs(a[inside] - b[inside]).max() > 5  # the ControlNet acted
    assert np.array_equal(a[~inside], np.asarray(source, np.int16)[~inside])
