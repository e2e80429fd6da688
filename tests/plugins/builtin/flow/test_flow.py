"""SD3 and Flux through difftool's core: detection, loading every layout, parity with diffusers, the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from difftool import cli
from difftool.app import api
from difftool.core.errors import ModelError
from difftool.core.family import ModelFamily
from difftool.core.images import read_metadata
from difftool.core.task import TaskResult
from difftool.plugins.builtin.flow.families import FAMILIES, detect_shapes
from difftool.plugins.builtin.flow.loader import is_flow_model, load_flow_model
from difftool.plugins.builtin.flow.tokenizers import clip_tokenizer, t5_tokenizer
from difftool.plugins.builtin.sd.checkpoint import read_shapes
from difftool.plugins.hookspecs import hookimpl
from difftool.plugins.registry import build_registry
from difftool.testing import SchedulerConformance

from . import tiny

SEED, STEPS, SIZE = 5, 3, (32, 24)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.fixture(scope="module")
def flux_parts() -> dict[str, Any]:
    return tiny.flux()


@pytest.fixture(scope="module")
def sd3_parts() -> dict[str, Any]:
    parts = tiny.sd3(seed=1)
    with torch.no_grad():  # SD3 files keep CLIP-L without its projection: the identity
        parts["text_encoder"].text_projection.weight.copy_(torch.eye(32))
    return parts


@pytest.fixture(scope="module")
def models(flux_parts: dict, sd3_parts: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow")
    return {
        "flux-folder": tiny.save_folder(flux_parts, root / "flux-folder"),
        "flux-comfy": tiny.save_flux_comfy(flux_parts, root / "comfy"),
        "sd3-folder": tiny.save_folder(sd3_parts, root / "sd3-folder"),
        "sd3-file": tiny.save_sd3_all_in_one(sd3_parts, root / "sd3.5-tiny.safetensors"),
    }


def ours(model: Path, **params: Any) -> Image.Image:
    run = {"prompt": "a red fox in snow", "width": SIZE[0], "height": SIZE[1], "steps": STEPS, **params}
    return api.run("generate", model=str(model), seed=SEED, **{"dtype": "fp32", **run}).images[0]


def flux_reference(parts: dict, guidance: float = 3.5, t5_tokens: int = 512) -> Image.Image:
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**parts, tokenizer=clip_tokenizer("clip_l"), tokenizer_2=t5_tokenizer())
    return pipe(
        "a red fox in snow", width=SIZE[0], height=SIZE[1], num_inference_steps=STEPS, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(SEED), max_sequence_length=t5_tokens,
    ).images[0]  # fmt: skip


def sd3_reference(parts: dict, negative: str = "") -> Image.Image:
    from diffusers import StableDiffusion3Pipeline

    tokenizers = {"tokenizer": clip_tokenizer("clip_l"), "tokenizer_2": clip_tokenizer("clip_g")}
    pipe = StableDiffusion3Pipeline(**parts, **tokenizers, tokenizer_3=t5_tokenizer())
    return pipe(
        "a red fox in snow", negative_prompt=negative, width=SIZE[0], height=SIZE[1], num_inference_steps=STEPS,
        guidance_scale=5.0, generator=torch.Generator().manual_seed(SEED), max_sequence_length=256,
    ).images[0]  # fmt: skip


def test_families_are_detected_from_names_and_shapes(models: dict, tmp_path: Path) -> None:
    assert is_flow_model(models["flux-folder"]).name == "flux"
    assert is_flow_model(models["flux-comfy"]).name == "flux"
    assert is_flow_model(models["sd3-folder"]).name == "sd3"
    assert is_flow_model(models["sd3-file"]).name == "sd3"
    shapes = read_shapes(models["flux-comfy"])
    schnell = {k: v for k, v in shapes.items() if not k.startswith("guidance_in.")}
    assert detect_shapes(schnell).name == "flux-schnell"
    fill = {**shapes, "img_in.weight": (shapes["img_in.weight"][0], 384)}
    assert detect_shapes(fill).name == "flux-fill"
    assert detect_shapes({"model.diffusion_model." + k: v for k, v in shapes.items()}).name == "flux"
    # The companions are not models, and the registry's family hook finds exactly the flow models.
    companions = models["flux-comfy"].parents[1]
    assert is_flow_model(companions / "text_encoders" / "clip_l.safetensors") is None
    registry = build_registry(entry_points=False)
    assert registry.family_for(models["sd3-file"], "generate") is not None
    assert registry.family_for(companions / "vae" / "ae.safetensors", "generate") is None
    assert registry.family_for(models["sd3-file"], "style") is not None
    assert registry.family_for(models["sd3-file"], "inpaint") is not None


def test_every_layout_loads_the_same_weights(models: dict, flux_parts: dict, sd3_parts: dict) -> None:
    for folder, single, parts in (("flux-folder", "flux-comfy", flux_parts), ("sd3-folder", "sd3-file", sd3_parts)):
        a, b = load_flow_model(models[folder]), load_flow_model(models[single])
        assert a.family == b.family
        for name in ("transformer", "vae"):
            expected = parts[name].state_dict()
            for key, value in getattr(b, name).state_dict().items():
                assert torch.equal(value, expected[key]), (single, name, key)
        assert set(a.encoders) == set(b.encoders)
        for role in a.encoders:
            x, y = a.encoders[role].state_dict(), b.encoders[role].state_dict()
            assert all(torch.equal(x[k], y[k]) for k in y), (single, role)
    assert load_flow_model(models["flux-comfy"]).sources == {"clip_l": "clip_l.safetensors",
                                                             "t5": "t5xxl_fp16.safetensors", "vae": "ae"}  # fmt: skip


def test_a_lone_transformer_file_says_where_to_put_its_companions(flux_parts: dict, tmp_path: Path) -> None:
    lone = tiny.save(tiny.bfl_flux_keys(flux_parts["transformer"].state_dict()), tmp_path / "flux1-dev.safetensors")
    with pytest.raises(ModelError) as error:
        load_flow_model(lone)
    assert "ae.safetensors" in error.value.fix or "models/text_encoders" in error.value.fix


@pytest.mark.parametrize("layout", ["flux-folder", "flux-comfy"])
def test_flux_dev_matches_flux_pipeline(layout: str, models: dict, flux_parts: dict) -> None:
    image = ours(models[layout], guidance_scale=3.5)
    assert np.asarray(image).std() > 1
    assert max_diff(image, flux_reference(flux_parts)) <= 2


@pytest.mark.parametrize("layout", ["sd3-folder", "sd3-file"])
def test_sd3_matches_stable_diffusion_3_pipeline_with_cfg(layout: str, models: dict, sd3_parts: dict) -> None:
    image = ours(models[layout], guidance_scale=5.0, negative_prompt="blurry")
    assert np.asarray(image).std() > 1
    assert max_diff(image, sd3_reference(sd3_parts, "blurry")) <= 2
    assert max_diff(image, sd3_reference(sd3_parts, "")) > 2  # the negative prompt went through CFG


def test_flux_schnell_runs_without_guidance_or_dynamic_shift(tmp_path: Path) -> None:
    parts = tiny.flux(guidance=False, seed=3)
    folder = tiny.save_folder(parts, tmp_path / "schnell")
    assert is_flow_model(folder).name == "flux-schnell"
    # Schnell reads 256 T5 tokens (dev 512), as diffusers' FluxPipeline documents for it.
    assert max_diff(ours(folder, guidance_scale=1.0), flux_reference(parts, 0.0, t5_tokens=256)) <= 2


def test_cli_generates_with_a_comfyui_flux_file(models: dict, tmp_path: Path) -> None:
    registry = build_registry(entry_points=False)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.cli, [
        "run", "generate", "--model", str(models["flux-comfy"]), "--prompt", "a lighthouse", "--width", "32",
        "--height", "32", "--steps", "2", "--guidance-scale", "3.5", "--seed", "4", "-o", str(out),
    ], obj=registry)  # fmt: skip
    assert result.exit_code == 0, result.output
    image = Image.open(out / "generate-4.png")
    assert image.size == (32, 32)
    meta = read_metadata(out / "generate-4.png")
    assert meta["difftool"]["model_family"] == "flux"
    assert meta["difftool"]["scheduler"] == "flow-euler"
    assert meta["difftool"]["distilled_guidance"] == 3.5


def test_unsupported_options_and_sizes_are_refused_in_one_line(models: dict) -> None:
    from difftool.core.errors import ParameterError

    with pytest.raises(ParameterError, match="--refiner is not supported"):
        ours(models["flux-folder"], refiner=str(models["sd3-folder"]))
    with pytest.raises(ParameterError, match="multiples of 4"):
        ours(models["flux-folder"], width=30)


class EchoFamily(ModelFamily):
    """A third party's family: recognises ``*.echo`` files and answers ``generate`` with a flat image."""

    name, families, tasks = "echo", ("echo",), ("generate",)

    def detect(self, path: Path) -> str | None:
        return "echo" if Path(path).suffix == ".echo" else None

    def run(self, task: str, request: Any, context: Any) -> TaskResult:
        size = (request.params["width"] or 8, request.params["height"] or 8)
        return TaskResult([Image.new("RGB", size, (10, 200, 30))], {"model_family": "echo"})


class EchoPlugin:
    @hookimpl
    def register_families(self, register):
        register(EchoFamily())


def test_a_plugin_family_runs_generate_and_duplicates_are_refused(tmp_path: Path) -> None:
    model = tmp_path / "m.echo"
    model.write_text("weights")
    registry = build_registry([EchoPlugin()], entry_points=False)
    result = api.run("generate", model=str(model), prompt="x", width=16, height=8, registry=registry)
    assert result.images[0].getpixel((3, 3)) == (10, 200, 30) and result.record["model_family"] == "echo"
    twice = build_registry([EchoPlugin(), EchoPlugin()], entry_points=False)
    assert any("already registered" in failure.error for failure in twice.failures)


@pytest.mark.slow
def test_fp8_weights_stay_fp8_and_compute_in_bf16(flux_parts: dict, tmp_path: Path) -> None:
    bfl = tiny.bfl_flux_keys(flux_parts["transformer"].state_dict())
    stored = {k: v.to(torch.float8_e4m3fn) for k, v in bfl.items()}
    fp8_file = tiny.save_flux_comfy(flux_parts, tmp_path / "fp8")
    tiny.save(stored, fp8_file)  # the transformer as people store it: float8_e4m3fn
    wide_file = tiny.save_flux_comfy(flux_parts, tmp_path / "fp32")
    tiny.save({k: v.float() for k, v in stored.items()}, wide_file)  # the same rounded weights in fp32
    import difftool.plugins.builtin.flow.loader as loader

    model = loader.load_flow_model(fp8_file, dtype=torch.bfloat16)
    block = model.transformer.transformer_blocks[0]
    assert block.attn.to_q.weight.dtype == torch.float8_e4m3fn  # kept in fp8 between uses
    assert block.attn.norm_q.weight.dtype == torch.bfloat16  # norms are not cast layer by layer
    # the AdaLN modulation linears stay as stored too (diffusers' "norm" name pattern would widen them)
    assert block.norm1.linear.weight.dtype == torch.float8_e4m3fn
    assert model.transformer.single_transformer_blocks[0].norm.linear.weight.dtype == torch.float8_e4m3fn
    low = np.asarray(ours(fp8_file, guidance_scale=3.5, dtype="bf16"), dtype=np.float32)
    high = np.asarray(ours(wide_file, guidance_scale=3.5, dtype="bf16"), dtype=np.float32)
    assert low.std() > 1 and np.abs(low - high).max() <= 2  # fp8 storage changes nothing but memory


def test_models_lists_flow_files_by_family(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    comfy = models["flux-comfy"].parents[2]
    monkeypatch.setenv("DIFFTOOL_MODELS", f"{comfy}:{models['sd3-file'].parent}")
    listed = {e.name: e.family for e in build_registry(entry_points=False).find_models()}
    assert listed["flux1-tiny"] == "flux"  # models/diffusion_models (the flow plugin's source)
    assert listed["sd3.5-tiny"] == "sd3" and listed["flux-folder"] == "flux"  # placed by the family hook
    assert "clip_l" not in listed  # text encoders are not models


FLUX_SCHEDULE = {**FAMILIES["flux"].scheduler_config(), "flux_sigmas": True}


class TestFlowEuler(SchedulerConformance):
    def make_scheduler(self):
        return build_registry(entry_points=False).make_scheduler("flow-euler", {**FLUX_SCHEDULE, "image_seq_len": 1024})


def test_flow_euler_shifts_with_resolution_and_refuses_sd_schedules() -> None:
    from difftool.core.errors import ParameterError

    registry = build_registry(entry_points=False)
    small, large = (registry.make_scheduler("flow-euler", {**FLUX_SCHEDULE, "image_seq_len": n}) for n in (256, 4096))
    small.set_timesteps(4)
    large.set_timesteps(4)
    assert float(small.timesteps[0]) == float(large.timesteps[0]) == 1000.0
    assert float(large.timesteps[2]) > float(small.timesteps[2])  # more tokens: more of the run at high noise
    with pytest.raises(ParameterError, match="flow-matching models"):
        registry.make_scheduler("flow-euler", {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear"})


def test_a_family_supplies_its_own_defaults_for_what_a_request_leaves_unset(models: dict, tmp_path: Path) -> None:
    """Flux.1 dev: 28 steps at distilled guidance 3.5 (diffusers' FluxPipeline defaults), not SD's 7;
    schnell 4 steps. Resolved once by the preflight; what the request names is kept."""
    from difftool.app.plan import preflight

    dev = preflight("generate", model=str(models["flux-folder"]), params={"prompt": "a fox"})
    assert (dev.params.steps, dev.params.guidance_scale) == (28, 3.5)
    named = preflight(
        "generate", model=str(models["flux-folder"]), params={"prompt": "a fox", "steps": 3, "guidance_scale": 5}
    )
    assert (named.params.steps, named.params.guidance_scale) == (3, 5.0)
    schnell = tiny.save_folder(tiny.flux(guidance=False, seed=3), tmp_path / "schnell")
    assert preflight("generate", model=str(schnell), params={"prompt": "a fox"}).params.steps == 4
    sd3 = preflight("style", model=str(models["sd3-file"]), params={"prompt": "a fox"})
    assert (sd3.params.steps, sd3.params.guidance_scale) == (28, 7.0)
