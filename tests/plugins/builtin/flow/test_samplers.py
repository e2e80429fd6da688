"""The flow samplers (DPM++ 2M, UniPC, Euler Karras / beta), Flux's true CFG and ``--shift``: each against
diffusers' own pipeline with the same scheduler and settings, and their A1111 / Forge metadata."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.app import api
from difftool.core.errors import ParameterError
from difftool.core.metadata import format_parameters, params_from_a1111, parse_parameters
from difftool.plugins.builtin.flow.families import FAMILIES
from difftool.plugins.builtin.flow.samplers import FLOW_SAMPLERS
from difftool.plugins.builtin.flow.tokenizers import clip_tokenizer, t5_tokenizer
from difftool.plugins.registry import build_registry
from difftool.testing import SchedulerConformance

from . import tiny

SEED, STEPS, SIZE, PROMPT = 5, 3, (32, 24), "a red fox in snow"


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.fixture(scope="module")
def parts() -> dict[str, dict[str, Any]]:
    sd3 = tiny.sd3(seed=1)
    with torch.no_grad():  # SD3 files keep CLIP-L without its projection: the identity
        sd3["text_encoder"].text_projection.weight.copy_(torch.eye(32))
    return {"flux": tiny.flux(seed=0), "sd3": sd3}


@pytest.fixture(scope="module")
def folders(parts: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow-samplers")
    return {name: tiny.save_folder(p, root / name) for name, p in parts.items()}


def ours(model: Path, **params: Any) -> Any:
    run = {"prompt": PROMPT, "width": SIZE[0], "height": SIZE[1], "steps": STEPS, "dtype": "fp32", **params}
    return api.run("generate", model=str(model), seed=SEED, **run)


def diffusers_scheduler(name: str, config: dict[str, Any]) -> Any:
    """The scheduler as a diffusers user configures it for a flow model (diffusers' documented flags)."""
    import diffusers

    if name == "flow-euler":
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    flags = {
        "flow-dpmpp-2m": ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                                          "flow_shift": config["shift"]}),
        "flow-unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                                   "flow_shift": config["shift"]}),
        "flow-euler-karras": ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}),
        "flow-euler-beta": ("FlowMatchEulerDiscreteScheduler", {"use_beta_sigmas": True}),
    }  # fmt: skip
    cls, extra = flags[name]
    return getattr(diffusers, cls).from_config({**config, **extra})


def reference(family: str, parts: dict, scheduler: Any, **kwargs: Any) -> Image.Image:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    parts = {**parts, "scheduler": scheduler}
    if family == "flux":
        pipe = FluxPipeline(**parts, tokenizer=clip_tokenizer("clip_l"), tokenizer_2=t5_tokenizer())
        kwargs = {"guidance_scale": 3.5, "max_sequence_length": 512, **kwargs}
    else:
        tokenizers = {"tokenizer": clip_tokenizer("clip_l"), "tokenizer_2": clip_tokenizer("clip_g")}
        pipe = StableDiffusion3Pipeline(**parts, **tokenizers, tokenizer_3=t5_tokenizer())
        kwargs = {"guidance_scale": 5.0, "negative_prompt": "blurry", "max_sequence_length": 256, **kwargs}
    return pipe(PROMPT, width=SIZE[0], height=SIZE[1], num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(SEED), **kwargs).images[0]  # fmt: skip


RUNS = {"flux": {"guidance_scale": 3.5}, "sd3": {"guidance_scale": 5.0, "negative_prompt": "blurry"}}


@pytest.mark.parametrize("name", sorted(FLOW_SAMPLERS))
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_every_flow_sampler_matches_diffusers_pipeline(name: str, family: str, parts: dict, folders: dict) -> None:
    result = ours(folders[family], scheduler=name, **RUNS[family])
    image = result.images[0]
    expected = reference(family, parts[family], diffusers_scheduler(name, dict(parts[family]["scheduler"].config)))
    assert np.asarray(image).std() > 1
    assert max_diff(image, expected) <= 2, (name, family)
    assert result.record["scheduler"] == name and result.record["scheduler_label"] == FLOW_SAMPLERS[name][0]
    if family == "sd3":
        assert result.record["shift"] == 3.0  # the model's (Flux dev's: test_shift_...)


def test_sd_sampler_names_with_a_flow_variant_mean_it(folders: dict) -> None:
    named = ours(folders["sd3"], scheduler="dpmpp-2m", **RUNS["sd3"])
    euler = ours(folders["sd3"], scheduler="euler", **RUNS["sd3"])
    assert named.record["scheduler"] == "flow-dpmpp-2m" and euler.record["scheduler"] == "flow-euler"
    assert max_diff(named.images[0], euler.images[0]) > 2  # another sampler, another image
    with pytest.raises(ParameterError, match="Stable Diffusion sampler"):
        ours(folders["sd3"], scheduler="ddim")


def test_true_cfg_matches_flux_pipeline_true_cfg_scale(parts: dict, folders: dict) -> None:
    scheduler = diffusers_scheduler("flow-euler", dict(parts["flux"]["scheduler"].config))
    result = ours(folders["flux"], guidance_scale=3.5, true_cfg=4.0, negative_prompt="blurry")
    expected = reference("flux", parts["flux"], scheduler, true_cfg_scale=4.0, negative_prompt="blurry")
    assert max_diff(result.images[0], expected) <= 2
    assert max_diff(result.images[0], ours(folders["flux"], guidance_scale=3.5).images[0]) > 2  # it changed
    assert result.record["true_cfg"] == 4.0 and result.record["negative_prompt"] == "blurry"
    with pytest.raises(ParameterError, match="--true-cfg is for Flux"):
        ours(folders["sd3"], true_cfg=3.0)


def test_true_cfg_in_img2img_matches_flux_img2img_pipeline(parts: dict, folders: dict, tmp_path: Path) -> None:
    from diffusers import FluxImg2ImgPipeline

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(photo)
    run = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 4, "strength": 0.8, "true_cfg": 3.0}
    image = api.run("style", str(photo), model=str(folders["flux"]), seed=SEED, dtype="fp32",
                    guidance_scale=3.5, **run).images[0]  # fmt: skip
    pipe = FluxImg2ImgPipeline(**parts["flux"], tokenizer=clip_tokenizer("clip_l"), tokenizer_2=t5_tokenizer())
    expected = pipe(PROMPT, negative_prompt="blurry", true_cfg_scale=3.0, image=Image.open(photo), strength=0.8,
                    num_inference_steps=4, guidance_scale=3.5, width=32, height=24, max_sequence_length=512,
                    generator=torch.Generator().manual_seed(SEED)).images[0]  # fmt: skip
    assert max_diff(image, expected) <= 2


def test_shift_replaces_the_models_and_is_recorded(parts: dict, folders: dict) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    shifted = ours(folders["sd3"], shift=1.5, **RUNS["sd3"])
    config = {**dict(parts["sd3"]["scheduler"].config), "shift": 1.5}
    expected = reference("sd3", parts["sd3"], FlowMatchEulerDiscreteScheduler.from_config(config))
    assert shifted.record["shift"] == 1.5 and max_diff(shifted.images[0], expected) <= 2
    default = reference(
        "sd3", parts["sd3"], FlowMatchEulerDiscreteScheduler.from_config(parts["sd3"]["scheduler"].config)
    )
    assert max_diff(shifted.images[0], default) > 2  # the model's shift, 3, gives another image
    # Flux dev's shift follows the image size (exp(mu)); that value, given back, reproduces the image.
    flux = ours(folders["flux"], **RUNS["flux"])
    config = FAMILIES["flux"].scheduler_config()
    tokens = (SIZE[0] // 4) * (SIZE[1] // 4)  # the tiny VAE downsamples by 2, Flux's patches by 2
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    mu = config["base_shift"] + slope * (tokens - config["base_image_seq_len"])
    assert flux.record["shift"] == pytest.approx(math.exp(mu), abs=1e-4)
    again = ours(folders["flux"], shift=flux.record["shift"], **RUNS["flux"])
    assert max_diff(again.images[0], flux.images[0]) <= 1


def test_flow_options_are_refused_for_stable_diffusion() -> None:
    from difftool.plugins.builtin.sd.family_params import refuse_flow_params

    with pytest.raises(ParameterError, match="--shift is for SD3 / Flux"):
        refuse_flow_params({"shift": 2.0, "true_cfg": None})
    with pytest.raises(ParameterError, match="--true-cfg is for SD3 / Flux"):
        refuse_flow_params({"shift": None, "true_cfg": 2.0})
    refuse_flow_params({"shift": None, "true_cfg": None})


def test_forge_metadata_is_written_and_read_back() -> None:
    record = {"prompt": "a fox", "negative_prompt": "blurry", "steps": 20, "guidance_scale": 3.5, "seed": 4,
              "scheduler": "flow-euler", "scheduler_label": "Euler (flow)", "size": "1024x1024",
              "distilled_guidance": 3.5, "true_cfg": 2.0, "shift": 1.15, "task": "generate"}  # fmt: skip
    text = format_parameters(record)
    assert "CFG scale: 2.0, Distilled CFG Scale: 3.5, Shift: 1.15, Seed: 4" in text
    labels = {e.label: e.name for e in build_registry(entry_points=False).schedulers.values()}
    back = params_from_a1111(parse_parameters(text), labels)
    assert back["guidance_scale"] == 3.5 and back["true_cfg"] == 2.0 and back["shift"] == 1.15
    assert back["scheduler"] == "flow-euler"
    # Forge's own text (no true CFG: "CFG scale: 1"), and an SD3 run's (no distilled guidance).
    forge = "a fox\nSteps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 1"
    back = params_from_a1111(parse_parameters(forge))
    assert back["guidance_scale"] == 3.5 and "true_cfg" not in back
    sd3 = format_parameters({**record, "distilled_guidance": None, "true_cfg": None, "shift": 3.0})
    assert "CFG scale: 3.5, Shift: 3.0" in sd3 and "Distilled" not in sd3
    assert params_from_a1111(parse_parameters(sd3))["guidance_scale"] == 3.5


def test_a_flux_png_carries_forge_infotext(folders: dict, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from difftool import cli
    from difftool.core.images import read_metadata

    out = tmp_path / "out"
    result = CliRunner().invoke(cli.cli, [
        "run", "generate", "--model", str(folders["flux"]), "--prompt", "a fox", "--width", "32", "--height", "32",
        "--steps", "2", "--guidance-scale", "3.5", "--true-cfg", "2", "--negative-prompt", "fog",
        "--scheduler", "flow-dpmpp-2m", "--seed", "4", "-o", str(out),
    ], obj=build_registry(entry_points=False))  # fmt: skip
    assert result.exit_code == 0, result.output
    text = Image.open(out / "generate-4.png").info["parameters"]
    assert "Sampler: DPM++ 2M (flow), CFG scale: 2.0, Distilled CFG Scale: 3.5, Shift: " in text
    assert read_metadata(out / "generate-4.png")["difftool"]["shift"] > 1


class TestFlowDpmpp2m(SchedulerConformance):
    def make_scheduler(self):
        config = {**FAMILIES["flux"].scheduler_config(), "flux_sigmas": True, "image_seq_len": 1024}
        return build_registry(entry_points=False).make_scheduler("flow-dpmpp-2m", config)
