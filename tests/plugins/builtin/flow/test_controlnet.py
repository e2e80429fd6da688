"""ControlNet for Flux and SD3 (``--control``): parity with FluxControlNetPipeline (incl. a union model with a
mode) and StableDiffusion3ControlNetPipeline; single files in the diffusers key layout; family checks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.app import api
from difftool.core.errors import DifftoolError
from difftool.plugins.builtin.flow import controlnet
from difftool.plugins.builtin.flow.controlled import union_mode
from difftool.plugins.builtin.flow.tokenizers import clip_tokenizer, t5_tokenizer
from difftool.plugins.builtin.sd.control import parse_unit
from difftool.plugins.registry import build_registry

from . import tiny

SEED, STEPS, PROMPT = 5, 4, "a lighthouse at dusk"

#: Stability's SD 3.5 ControlNets: no text input, no patch embedding of their own, pooled text kept.
SD35_STABILITY = {"joint_attention_dim": None, "pos_embed_type": None, "use_pos_embed": False,
                  "force_zeros_for_pooled_projection": False, "qk_norm": None}  # fmt: skip


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.fixture(scope="module")
def edges(tmp_path_factory: pytest.TempPathFactory) -> Path:
    y, x = np.mgrid[0:32, 0:32]
    rgb = np.stack([(x // 8 % 2) * 255, (y // 8 % 2) * 255, (x + y) * 4], axis=-1).clip(0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("control") / "edges.png"
    Image.fromarray(rgb).save(path)
    return path


def flux_controlnet(seed: int, num_mode: int | None = None) -> Any:
    from diffusers import FluxControlNetModel

    net = FluxControlNetModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 14, 14),
        num_mode=num_mode,
    )  # fmt: skip
    return tiny._randomize(net, seed)


def sd3_controlnet(seed: int, stability: bool = False) -> Any:
    """InstantX's kind (reads the text, zero pooled text, own patch embedding), or ``stability``: SD 3.5's
    own ControlNets' kind (no text, pooled text, the transformer's patch embedding)."""
    from diffusers import SD3ControlNetModel

    kind: dict[str, Any] = SD35_STABILITY if stability else {"joint_attention_dim": 64, "qk_norm": "rms_norm"}
    net = SD3ControlNetModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        caption_projection_dim=32, pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16, **kind,
    )  # fmt: skip
    return tiny._randomize(net, seed)


def ours(model: Path, *control: str, **params: Any) -> api.RunResult:
    run = {"prompt": PROMPT, "steps": STEPS, "width": 32, "height": 32, "dtype": "fp32", **params}
    return api.run("generate", model=str(model), seed=SEED, control=list(control), **run)


def flux_reference(parts: dict[str, Any], net: Any, edges: Path | list[Path], **kwargs: Any) -> Image.Image:
    from diffusers import FluxControlNetPipeline

    tokenizers = {"tokenizer": clip_tokenizer("clip_l"), "tokenizer_2": t5_tokenizer()}
    pipe = FluxControlNetPipeline(**copy.deepcopy(parts), controlnet=copy.deepcopy(net), **tokenizers)
    images = [Image.open(p) for p in edges] if isinstance(edges, list) else Image.open(edges)
    return pipe(PROMPT, control_image=images, num_inference_steps=STEPS, guidance_scale=3.5, width=32,
                height=32, generator=torch.Generator().manual_seed(SEED), **kwargs).images[0]  # fmt: skip


def test_flux_controlnet_single_file_matches_flux_controlnet_pipeline(
    edges: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts, net = tiny.flux(seed=31), flux_controlnet(32)
    model = tiny.save_flux_comfy(parts, tmp_path)
    # InstantX's diffusion_pytorch_model.safetensors downloaded alone: diffusers keys, no config
    tiny.save(net.state_dict(), tmp_path / "models" / "controlnet" / "flux-canny.safetensors")
    monkeypatch.setenv("DIFFTOOL_MODELS", str(tmp_path))
    listed = {entry.name: entry.family for entry in build_registry(entry_points=False).find_models()}
    assert listed["flux-canny"] == "flux-controlnet"
    result = ours(model, f"flux-canny={edges},weight=0.8,start=0.25", guidance_scale=3.5)  # by its listed name
    reference = flux_reference(parts, net, edges, controlnet_conditioning_scale=0.8, control_guidance_start=0.25)
    assert max_diff(result.images[0], reference) <= 2
    plain = ours(model, guidance_scale=3.5).images[0]
    assert max_diff(plain, result.images[0]) > 8  # the ControlNet steers the image
    assert result.record["control"][0].startswith("flux-canny=")


def test_flux_union_controlnet_takes_each_units_mode(
    edges: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import FluxControlNetModel, FluxMultiControlNetModel

    parts, net = tiny.flux(seed=33), flux_controlnet(34, num_mode=7)
    model = tiny.save_flux_comfy(parts, tmp_path)
    folder = tmp_path / "union"
    net.save_pretrained(folder)  # a diffusers folder (config.json + weights)
    assert controlnet.detect(folder) == "flux-controlnet"
    inverted = tmp_path / "inverted.png"
    Image.fromarray(255 - np.asarray(Image.open(edges))).save(inverted)
    # two conditions on one union ControlNet (their residuals summed), each with its mode
    units = (f"{folder}={edges},mode=depth,end=0.75", f"{folder}={inverted},mode=0,weight=0.5")
    seen, forward = [], FluxControlNetModel.forward

    def spy(self: Any, *args: Any, controlnet_mode: Any = None, **kwargs: Any) -> Any:
        seen.append(controlnet_mode[:, 0].tolist())
        return forward(self, *args, controlnet_mode=controlnet_mode, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(FluxControlNetModel, "forward", spy)
        both = ours(model, *units, guidance_scale=3.5).images[0]
    # one mode token among 512 text tokens barely moves a tiny model's pixels: check the modes it was given
    assert seen == [[2], [0]] * 3 + [[0]]  # the first unit ends after 3 of 4 steps
    multi = FluxMultiControlNetModel([net])
    reference = flux_reference(parts, multi, [edges, inverted], control_mode=[2, 0],
                               controlnet_conditioning_scale=[1.0, 0.5], control_guidance_end=[0.75, 1.0])  # fmt: skip
    assert max_diff(both, reference) <= 2
    loaded = controlnet.load(folder)
    assert loaded.union and [union_mode(parse_unit(f"{folder}=x,{fields}"), loaded) for fields in
                             ("pre=blur", "pre=canny,mode=openpose", "mode=5")] == [3, 4, 5]  # fmt: skip
    with pytest.raises(DifftoolError, match="needs a mode"):
        ours(model, f"{folder}={edges}", guidance_scale=3.5)
    with pytest.raises(DifftoolError, match="no mode"):
        ours(model, f"{folder}={edges},mode=9", guidance_scale=3.5)


@pytest.mark.parametrize("stability", [False, True], ids=["instantx", "sd3.5"])
def test_sd3_controlnet_matches_sd3_controlnet_pipeline(edges: Path, tmp_path: Path, stability: bool) -> None:
    from diffusers import StableDiffusion3ControlNetPipeline

    parts, net = tiny.sd3(seed=35), sd3_controlnet(36, stability)
    with torch.no_grad():  # SD3 files keep CLIP-L without its projection: the identity
        parts["text_encoder"].text_projection.weight.copy_(torch.eye(32))
        # diffusers samples SD3's control latents from the unseeded global generator; difftool takes the mean.
        # A near-zero spread (as a real VAE's) makes the two the same: logvar -30.
        conv = parts["vae"].encoder.conv_out
        conv.weight[16:].zero_()
        conv.bias[16:].fill_(-30.0)
    model = tiny.save_sd3_all_in_one(parts, tmp_path / "sd3.5-tiny.safetensors")
    file = tiny.save(net.state_dict(), tmp_path / "sd3-canny.safetensors")
    assert controlnet.detect(file) == "sd3-controlnet"
    result = ours(model, f"{file}={edges},weight=0.7", guidance_scale=5.0, negative_prompt="blurry")
    tokenizers = {"tokenizer": clip_tokenizer("clip_l"), "tokenizer_2": clip_tokenizer("clip_g")}
    pipe = StableDiffusion3ControlNetPipeline(**copy.deepcopy(parts), **tokenizers, tokenizer_3=t5_tokenizer(),
                                              controlnet=copy.deepcopy(net))  # fmt: skip
    reference = pipe(PROMPT, negative_prompt="blurry", control_image=Image.open(edges), num_inference_steps=STEPS,
                     guidance_scale=5.0, controlnet_conditioning_scale=0.7, max_sequence_length=256, width=32,
                     height=32, generator=torch.Generator().manual_seed(SEED)).images[0]  # fmt: skip
    image = result.images[0]
    assert np.asarray(image).std() > 1 and max_diff(image, reference) <= 2
    assert max_diff(image, ours(model, guidance_scale=5.0, negative_prompt="blurry").images[0]) > 2


def test_a_controlnet_of_another_family_is_refused_naming_both(edges: Path, tmp_path: Path) -> None:
    from tests.plugins.builtin.sd import tiny as sd_tiny

    flux = tiny.save_flux_comfy(tiny.flux(seed=37), tmp_path)
    sd3_net = tiny.save(sd3_controlnet(38).state_dict(), tmp_path / "sd3-canny.safetensors")
    with pytest.raises(DifftoolError, match=r"sd3-canny is an SD3 ControlNet.*the model is Flux.1 dev"):
        ours(flux, f"{sd3_net}={edges}", guidance_scale=3.5)
    sd15 = sd_tiny.controlnet(sd_tiny.components(vae_levels=4)["unet"])
    sd15_file = sd_tiny.save_controlnet_file(sd15, tmp_path / "control_v11p_sd15_canny.safetensors")
    with pytest.raises(DifftoolError, match=r"control_v11p_sd15_canny.* is an sd1 ControlNet, the model is Flux.1 dev"):
        ours(flux, f"{sd15_file}={edges}", guidance_scale=3.5)
    sd15_model = sd_tiny.save_folder(sd_tiny.components(vae_levels=4), tmp_path / "sd15")
    with pytest.raises(
        DifftoolError, match=r"sd3-canny.safetensors is an SD3 ControlNet, the model is Stable Diffusion 1.x"
    ):
        api.run("generate", model=str(sd15_model), prompt="x", steps=2, width=64, height=64,
                control=[f"{sd3_net}={edges}"])  # fmt: skip
    with pytest.raises(DifftoolError, match="--control runs with generate"):
        api.run("style", str(edges), model=str(flux), prompt="x", steps=2, control=[f"{sd3_net}={edges}"])


@pytest.mark.parametrize(
    "kind",
    [
        {"num_layers": 5, "num_single_layers": 10, "num_mode": 10, "guidance_embeds": True},  # InstantX union
        {"num_layers": 2, "num_single_layers": 0, "conditioning_embedding_channels": 16, "patch_size": 2},  # XLabs
        {"num_layers": 6, "num_attention_heads": 24, "caption_projection_dim": 1536, "pos_embed_max_size": 192},
        {"num_layers": 19, "num_attention_heads": 38, "caption_projection_dim": 2432, **SD35_STABILITY},
    ],
    ids=["flux-union", "flux-xlabs-diffusers", "sd3-instantx", "sd3.5-large-stability"],
)
def test_a_single_files_config_is_read_from_its_shapes_at_full_size(kind: dict[str, Any]) -> None:
    from accelerate import init_empty_weights
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    cls = SD3ControlNetModel if "caption_projection_dim" in kind else FluxControlNetModel
    with init_empty_weights():  # full-size configs, no memory
        net = cls(**kind)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    arch = controlnet.arch_from_shapes(shapes)
    config = (controlnet.flux_config if arch == "flux" else controlnet.sd3_config)(shapes)
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(net.config).items()}
    assert arch == ("sd3" if cls is SD3ControlNetModel else "flux")
    assert {k: v for k, v in config.items() if plain[k] != v} == {}
