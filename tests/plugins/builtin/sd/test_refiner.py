"""generate --refiner: SDXL base to the switch point, the refiner after it, as diffusers' base + refiner pipelines."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from difftool.app import api
from difftool.core.errors import ModelError, ParameterError
from difftool.plugins.builtin.sd import loader
from difftool.plugins.builtin.sd.families import FAMILIES, detect_family, family_from_unet_config
from difftool.plugins.registry import Registry

from . import tiny
from .test_parity import SEED, max_diff, reference_scheduler

PROMPT = {"prompt": "a glass teapot", "negative_prompt": "dust"}
SIZE = {"width": 48, "height": 32}


@pytest.fixture(scope="module")
def base_parts() -> dict[str, Any]:
    return tiny.components(xl=True, seed=2)


@pytest.fixture(scope="module")
def refiner_parts() -> dict[str, Any]:
    return tiny.refiner_components(seed=5)


@pytest.fixture(scope="module")
def models(base_parts: dict, refiner_parts: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd")
    return {
        "base": tiny.save_folder(base_parts, root / "tiny-sdxl"),
        "refiner": tiny.save_folder(refiner_parts, root / "tiny-refiner"),
        "refiner_file": tiny.save_single_file(refiner_parts, root / "tiny-refiner-file.safetensors"),
        "sd1": tiny.save_folder(tiny.components(seed=1), root / "tiny-sd1"),
    }


def reference(base_parts: dict, refiner_parts: dict, scheduler: str, switch: float, steps: int, **control: Any) -> Any:
    """diffusers: the base with ``denoising_end`` (latents out), the refiner with ``denoising_start``;
    ``control``: the ControlNet pipeline's arguments (``controlnet``, ``image``, ...) for the base."""
    from diffusers import (
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )

    generator = torch.Generator("cpu").manual_seed(SEED)
    parts = {**base_parts, "scheduler": reference_scheduler(scheduler)}
    if control:
        base = StableDiffusionXLControlNetPipeline(**parts, controlnet=control.pop("controlnet"))
    else:
        base = StableDiffusionXLPipeline(**parts)
    common = {"num_inference_steps": steps, "guidance_scale": 5.0, "generator": generator, **PROMPT}
    latents = base(**common, **SIZE, **control, denoising_end=switch, output_type="latent").images
    refiner = StableDiffusionXLImg2ImgPipeline(
        **{**refiner_parts, "scheduler": reference_scheduler(scheduler)},
        text_encoder=None,
        tokenizer=None,
        requires_aesthetics_score=True,
    )
    return refiner(**common, image=latents, denoising_start=switch).images[0]


@pytest.mark.parametrize(("scheduler", "switch"), [("euler", 0.8), ("dpmpp-2m", 0.7), ("euler-a", 0.6)])
def test_base_and_refiner_match_diffusers(
    scheduler: str, switch: float, base_parts: dict, refiner_parts: dict, models: dict
) -> None:
    steps = 7
    reported: list[tuple[int, int]] = []
    common = {**PROMPT, **SIZE, "steps": steps, "guidance_scale": 5.0, "scheduler": scheduler, "seed": SEED}
    ours = api.run(
        "generate",
        model=str(models["base"]),
        refiner=str(models["refiner"]),
        refiner_switch=switch,
        dtype="fp32",
        progress=lambda step, total, _preview=None: reported.append((step, total)),
        **common,
    )
    ref = reference(base_parts, refiner_parts, scheduler, switch, steps)
    assert max_diff(ours.images[0], ref) <= 1
    # Progress covers both halves, one plan of `steps` steps.
    assert reported == [(i, steps) for i in range(1, steps + 1)]
    record = ours.record
    assert record["refiner"] == "tiny-refiner" and record["refiner_switch"] == switch
    assert len(record["refiner_hash"]) == 10 and record["model_family"] == "sdxl"
    # The refiner does change the picture: the base alone, same seed, differs by a lot.
    alone = api.run("generate", model=str(models["base"]), dtype="fp32", **common)
    assert max_diff(alone.images[0], ours.images[0]) > 40


def test_controlnet_guides_the_base_share_as_diffusers_controlnet_pipeline_does(tmp_path: Path) -> None:
    """ControlNet (made for the base) on the base's share, its start/end fractions of the whole plan
    (diffusers' ``StableDiffusionXLControlNetPipeline(denoising_end=s)``), then the refiner unguided."""
    from PIL import Image

    from .test_parity import photo

    # 8x VAEs, as ControlNet's conditioning embedding assumes.
    base_parts, refiner_parts = tiny.components(xl=True, seed=2, vae_levels=4), tiny.refiner_components(5, 4)
    models = {"base": tiny.save_folder(base_parts, tmp_path / "tiny-sdxl")}
    models["refiner"] = tiny.save_folder(refiner_parts, tmp_path / "tiny-refiner")
    net = tiny.controlnet(base_parts["unet"], seed=6)
    file = tiny.save_controlnet_file(net, tmp_path / "cn-xl.safetensors")
    photo((80, 60)).save(tmp_path / "control.png")
    steps, switch = 8, 0.7
    common = {**PROMPT, **SIZE, "steps": steps, "guidance_scale": 5.0, "scheduler": "euler", "seed": SEED}
    common |= {"model": str(models["base"]), "refiner": str(models["refiner"]), "refiner_switch": switch}
    ours = api.run(
        "generate", dtype="fp32", control=[f"{file}={tmp_path / 'control.png'},weight=0.9,end=0.5"], **common
    )
    image = Image.open(tmp_path / "control.png")
    ref = reference(base_parts, refiner_parts, "euler", switch, steps, controlnet=net, image=image,
                    controlnet_conditioning_scale=0.9, control_guidance_end=0.5)  # fmt: skip
    assert max_diff(ours.images[0], ref) <= 1
    assert ours.record["controlnet"][0].startswith("Module: none, Model: cn-xl [") and ours.record["refiner"]
    # Fractions of the whole plan: ending at 0.5 is not ending with the base's share (0.7) of it.
    later = api.run(
        "generate", dtype="fp32", control=[f"{file}={tmp_path / 'control.png'},weight=0.9,end=0.7"], **common
    )
    assert max_diff(later.images[0], ours.images[0]) > 0


def test_with_hires_the_refiner_finishes_the_second_pass_as_diffusers_composition(
    base_parts: dict, refiner_parts: dict, models: dict
) -> None:
    """A1111's default ("Hires refiner: second pass"): the base's txt2img, latents upscaled, then the
    base's img2img to the switch and the refiner after it, as diffusers' pipelines composed."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    steps, hires_steps, strength, switch = 4, 6, 0.7, 0.8
    ours = api.run(
        "generate", model=str(models["base"]), refiner=str(models["refiner"]), refiner_switch=switch, hires=2.0,
        hires_steps=hires_steps, hires_strength=strength, steps=steps, guidance_scale=5.0, scheduler="euler",
        seed=SEED, dtype="fp32", **PROMPT, **SIZE,
    )  # fmt: skip
    generator = torch.Generator("cpu").manual_seed(SEED)
    common = {"guidance_scale": 5.0, "generator": generator, **PROMPT}
    base = {**base_parts, "scheduler": reference_scheduler("euler")}
    latents = StableDiffusionXLPipeline(**base)(**common, **SIZE, num_inference_steps=steps, output_type="latent")
    small = latents.images
    upscaled = torch.nn.functional.interpolate(small, size=(small.shape[2] * 2, small.shape[3] * 2), mode="bilinear")
    second = StableDiffusionXLImg2ImgPipeline(**base)(
        **common, image=upscaled, strength=strength, num_inference_steps=hires_steps, denoising_end=switch,
        output_type="latent",
    ).images  # fmt: skip
    refiner = StableDiffusionXLImg2ImgPipeline(
        **{**refiner_parts, "scheduler": reference_scheduler("euler")}, text_encoder=None, tokenizer=None,
        requires_aesthetics_score=True,
    )  # fmt: skip
    ref = refiner(**common, image=second, num_inference_steps=hires_steps, denoising_start=switch).images[0]
    assert ours.images[0].size == (SIZE["width"] * 2, SIZE["height"] * 2) == ref.size
    assert max_diff(ours.images[0], ref) <= 1
    assert ours.record["refiner_switch"] == switch and ours.record["hires_upscaler"] == "latent"


def test_style_with_a_refiner_matches_diffusers_img2img_then_refiner(
    base_parts: dict, refiner_parts: dict, models: dict
) -> None:
    """``style --refiner``: the base's img2img to the switch, the refiner after it (A1111's img2img)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from .test_parity import photo

    picture, strength, switch, steps = photo((48, 32)), 0.75, 0.6, 6
    ours = api.run(
        "style", picture, model=str(models["base"]), refiner=str(models["refiner"]), refiner_switch=switch,
        prompt=PROMPT["prompt"], negative_prompt=PROMPT["negative_prompt"], strength=strength, steps=steps,
        guidance_scale=5.0, scheduler="euler", seed=SEED, dtype="fp32",
    )  # fmt: skip
    generator = torch.Generator("cpu").manual_seed(SEED)
    common = {"guidance_scale": 5.0, "generator": generator, "num_inference_steps": steps, **PROMPT}
    base = StableDiffusionXLImg2ImgPipeline(**{**base_parts, "scheduler": reference_scheduler("euler")})
    latents = base(**common, image=picture, strength=strength, denoising_end=switch, output_type="latent").images
    refiner = StableDiffusionXLImg2ImgPipeline(
        **{**refiner_parts, "scheduler": reference_scheduler("euler")}, text_encoder=None, tokenizer=None,
        requires_aesthetics_score=True,
    )  # fmt: skip
    ref = refiner(**common, image=latents, denoising_start=switch).images[0]
    assert max_diff(ours.images[0], ref) <= 1
    assert ours.record["refiner"] == "tiny-refiner" and ours.record["task"] == "style"


def test_refiner_loads_from_an_original_layout_single_file(models: dict) -> None:
    from safetensors import safe_open

    path = models["refiner_file"]
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "conditioner.embedders.0.model.text_projection" in keys
    assert not any(k.startswith(("conditioner.embedders.1.", "cond_stage_model.")) for k in keys)
    model = loader.load_sd_model(path)
    folder = loader.load_sd_model(models["refiner"])
    assert model.family.name == folder.family.name == "sdxl-refiner"
    assert [type(e).__name__ for e in model.text_encoders] == ["CLIPTextModelWithProjection"]
    for part in ("unet", "vae"):
        ours, theirs = getattr(model, part).state_dict(), getattr(folder, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ours, theirs = model.text_encoders[0].state_dict(), folder.text_encoders[0].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # A single file (no sidecar) gives the same image as the folder.
    common = {**PROMPT, **SIZE, "steps": 5, "scheduler": "euler", "seed": SEED, "dtype": "fp32"}
    a = api.run("generate", model=str(models["base"]), refiner=str(path), **common)
    b = api.run("generate", model=str(models["base"]), refiner=str(models["refiner"]), **common)
    assert max_diff(a.images[0], b.images[0]) <= 1  # the same weights: equal up to float rounding


def test_refiner_family_detection() -> None:
    shapes = {  # SDXL refiner 1.0's U-Net entry, width and text encoder (original layout, full size)
        "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (768, 1280),
        "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
        "conditioner.embedders.0.model.text_projection": (1280, 1280),
    }
    assert detect_family(shapes) is FAMILIES["sdxl-refiner"]
    assert family_from_unet_config(FAMILIES["sdxl-refiner"].config("unet")) is FAMILIES["sdxl-refiner"]
    assert family_from_unet_config(FAMILIES["sdxl"].config("unet")) is FAMILIES["sdxl"]
    assert FAMILIES["sdxl-refiner"].text_encoders == ("text_encoder_2",)


def test_refiner_folder_is_told_apart_by_its_text_encoders(models: dict) -> None:
    config = tiny.unet_config(xl=True, refiner=True)  # tiny widths: only the folder tells
    assert family_from_unet_config(config).name == "sdxl"
    assert family_from_unet_config(config, models["refiner"]).name == "sdxl-refiner"
    assert family_from_unet_config(config, models["base"]).name == "sdxl"


def test_listed_with_its_family(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from difftool.plugins.builtin.models import FolderModelSource

    monkeypatch.setenv("DIFFTOOL_MODELS", str(models["refiner"].parent))
    found = {e.name: e.family for e in FolderModelSource().find()}
    assert found["tiny-refiner"] == found["tiny-refiner-file"] == "sdxl-refiner"
    assert found["tiny-sdxl"] == "sdxl"


def test_refiner_errors(models: dict) -> None:
    common = {**PROMPT, **SIZE, "steps": 4, "seed": SEED}
    base, refiner = str(models["base"]), str(models["refiner"])
    with pytest.raises(ModelError, match="SDXL refiner, which only finishes.*--refiner"):
        api.run("generate", model=refiner, **common)
    with pytest.raises(ModelError, match="finishes SDXL base models; tiny-sd1 is Stable Diffusion 1.x"):
        api.run("generate", model=str(models["sd1"]), refiner=refiner, **common)
    with pytest.raises(ModelError, match="is Stable Diffusion XL base, not an SDXL refiner"):
        api.run("generate", model=base, refiner=base, **common)
    with pytest.raises(ParameterError, match="--refiner-switch 0.01 with 4 steps leaves the base no step"):
        api.run("generate", model=base, refiner=refiner, refiner_switch=0.01, scheduler="euler", **common)
    steps: list[int] = []  # refused before the first pass: no step runs
    with pytest.raises(ParameterError, match="0.2 comes before --hires-strength 0.5 starts the pass") as early:
        api.run("generate", model=base, refiner=refiner, refiner_switch=0.2, hires=1.5, hires_strength=0.5,
                progress=lambda step, *_: steps.append(step), **common)  # fmt: skip
    assert not steps and re.search(
        r"raise --refiner-switch to 0\.\d+ or more, or raise --hires-strength", str(early.value)
    )


def test_style_switch_before_the_img2img_start_is_refused_with_the_switch_that_works(models: dict) -> None:
    """Timestep spacing puts 6 Euler steps at strength 0.5 at t=333, not 500: the hint says 0.67, which runs."""
    from .test_parity import photo

    common = {"model": str(models["base"]), "refiner": str(models["refiner"]), "prompt": "a teapot", "steps": 6}
    common |= {"strength": 0.5, "scheduler": "euler", "seed": SEED}
    with pytest.raises(
        ParameterError, match=r"--refiner-switch 0.6 comes before --strength 0.5 starts the pass \(at 0.67"
    ):
        api.run("style", photo((48, 32)), refiner_switch=0.6, **common)
    with pytest.raises(ParameterError, match="raise --refiner-switch to 0.67 or more, or raise --strength"):
        api.run("style", photo((48, 32)), refiner_switch=0.66, **common)
    assert api.run("style", photo((48, 32)), refiner_switch=0.67, **common).record["refiner_switch"] == 0.67


def test_refiner_runs_on_onnx_and_tensorrt(models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both U-Nets exported (the refiner's graph takes its 5 time ids: size, crop, aesthetic score), on
    ONNX Runtime (U-Nets alone, and with the text encoders and VAE) and TensorRT (stand-ins)."""
    import numpy as np

    from difftool.exporters.onnx import UNetSignature
    from difftool.testing.gpu import gpu_harness

    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    base = loader.load_sd_model(str(models["base"]))
    refiner = loader.load_sd_model(str(models["refiner"]))
    assert (UNetSignature.of(base.unet).time_ids, UNetSignature.of(refiner.unet).time_ids) == (6, 5)
    common = {**PROMPT, **SIZE, "steps": 5, "seed": SEED, "scheduler": "euler", "dtype": "fp32"}
    common |= {"model": str(models["base"]), "refiner": str(models["refiner"]), "refiner_switch": 0.6}
    reference = api.run("generate", **common)
    runs = {
        "onnx": api.run("generate", backend="onnx", **common),
        "onnx-all": api.run("generate", backend="onnx", backend_options={"export": "all"}, **common),
    }
    with gpu_harness() as harness:
        runs["tensorrt"] = api.run("generate", backend="tensorrt", device="cuda", **common)
    assert harness.trt.builds == 2  # one engine per U-Net
    assert {profiles[0]["time_ids"][0][1] for profiles in harness.trt.build_profiles} == {5, 6}
    for name, result in runs.items():
        a, b = (np.asarray(r.images[0], np.int16) for r in (reference, result))
        assert np.abs(a - b).max() <= 1, name  # measured: 0-1/255
        assert result.record["refiner"] == "tiny-refiner", name
        assert len(result.record["artifact"].split(", ")) == 2, name  # the base's export and the refiner's


def test_a1111_metadata_round_trip(models: dict, tmp_path: Path) -> None:
    from difftool.core.images import read_metadata, save_image
    from difftool.core.metadata import format_parameters, params_from_a1111

    common = {**PROMPT, **SIZE, "steps": 4, "scheduler": "euler", "seed": SEED}
    result = api.run(
        "generate", model=str(models["base"]), refiner=str(models["refiner"]), refiner_switch=0.75, **common
    )
    saved = read_metadata(save_image(result.images[0], tmp_path / "r.png", result.record))
    a1111 = saved["parameters"]
    assert a1111["Refiner"] == f"tiny-refiner [{result.record['refiner_hash']}]"
    assert a1111["Refiner switch at"] == "0.75" and a1111["Model"] == "tiny-sdxl"
    params = params_from_a1111(a1111)
    assert params["refiner"] == "tiny-refiner" and params["refiner_switch"] == 0.75
    assert saved["difftool"]["refiner"] == "tiny-refiner"
    # Without a refiner, the switch's default is not written.
    assert "Refiner" not in format_parameters({"prompt": "x", "steps": 4, "refiner_switch": 0.8})
    # A1111's own text reads back the same way.
    text = "a cat\nSteps: 20, Sampler: Euler, Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8"
    from difftool.core.metadata import parse_parameters

    read = params_from_a1111(parse_parameters(text))
    assert read["refiner"] == "sd_xl_refiner_1.0" and read["refiner_switch"] == 0.8


def test_cli_run_with_a_listed_refiner(models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from difftool import cli
    from difftool.core.images import read_metadata
    from difftool.plugins.registry import build_registry

    monkeypatch.setenv("DIFFTOOL_MODELS", str(models["refiner"].parent))
    registry = build_registry(entry_points=False)
    out = tmp_path / "out"
    args = ["run", "generate", "--model", "tiny-sdxl", "--refiner", "tiny-refiner-file", "--refiner-switch", "0.6"]
    args += ["--prompt", "a castle", "--width", "32", "--height", "24", "--steps", "3", "--seed", "7", "-o", str(out)]
    result = CliRunner().invoke(cli.cli, args, obj=registry)
    assert result.exit_code == 0, result.output
    [png] = sorted(out.glob("*.png"))
    assert Image.open(png).size == (32, 24)
    text = read_metadata(png)["parameters"]
    assert text["Refiner"].startswith("tiny-refiner-file [") and text["Refiner switch at"] == "0.6"
    bad = CliRunner().invoke(cli.cli, [*args[:4], "--refiner", "tiny-sdxl", *args[6:], "-o", str(tmp_path / "bad")])
    # A listed base is refused by its family at preflight, before any model loads.
    assert bad.exit_code != 0 and "--refiner 'tiny-sdxl' is a sdxl model, not sdxl-refiner" in bad.output


def test_server_accepts_listed_refiners_only(models: dict) -> None:
    from difftool.core.models import ModelEntry
    from difftool.core.params import resolve_value
    from difftool.plugins.builtin.sd.tasks import Generate
    from difftool.plugins.registry import Registry as Plain
    from difftool.serve.a1111_map import Txt2ImgRequest, refiner_params
    from difftool.serve.security import PathPolicy, PolicyResolver

    class Registry(Plain):
        def find_models(self) -> list[ModelEntry]:
            return [
                ModelEntry("tiny-refiner", models["refiner"], "sdxl-refiner", "test"),
                ModelEntry("tiny-sdxl", models["base"], "sdxl", "test"),
            ]

    def check_params(task: Any, params: dict, registry: Registry, policy: PathPolicy) -> dict:
        """What the server's preflight makes of the ``refiner`` a request sends (by the parameter's kind)."""
        resolver, param = PolicyResolver(registry, policy), task.param("refiner")
        return {"refiner": resolve_value(param, param.validate(params["refiner"]), resolver)}

    def request(**fields: Any) -> Txt2ImgRequest:
        return Txt2ImgRequest(prompt="x", **fields)

    refiners = ["tiny-refiner"]
    assert refiner_params(request(refiner_checkpoint="tiny-refiner [0123abcd]", refiner_switch_at=0.7), refiners) == {
        "refiner": "tiny-refiner",
        "refiner_switch": 0.7,
    }
    assert refiner_params(request(refiner_checkpoint="tiny-refiner.safetensors"), refiners) == {
        "refiner": "tiny-refiner"
    }
    assert refiner_params(request(refiner_checkpoint="tiny-refiner", refiner_switch_at=1.0), refiners) == {}
    assert refiner_params(request(refiner_switch_at=0), refiners) == {}
    with pytest.raises(ParameterError, match="refiner_checkpoint: 'tiny-sdxl' is not one of this server's SDXL"):
        refiner_params(request(refiner_checkpoint="tiny-sdxl"), refiners)
    with pytest.raises(ParameterError, match="refiner_switch_at: 0.5 needs a refiner_checkpoint"):
        refiner_params(request(refiner_switch_at=0.5), refiners)
    # The native API: a refiner is a listed refiner's name, never a path or another family's model.
    checked = check_params(Generate(), {"refiner": "tiny-refiner"}, Registry(), PathPolicy(()))
    assert checked["refiner"] == "tiny-refiner" and checked["refiner"].path == models["refiner"]
    for name in ("tiny-sdxl", str(models["refiner"])):
        with pytest.raises(ParameterError, match="not one of this server's models"):
            check_params(Generate(), {"refiner": name}, Registry(), PathPolicy(()))
