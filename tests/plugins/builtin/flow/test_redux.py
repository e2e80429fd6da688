"""Flux Redux (--reference on Flux): parity with diffusers' FluxPriorReduxPipeline -> FluxPipeline on tiny
random models, the files people have (BFL's projector, ComfyUI's SigLIP file, diffusers' folder), and the
one-line refusals."""

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
from difftool.core.errors import DifftoolError, ParameterError
from difftool.core.images import read_metadata
from difftool.plugins.builtin.flow import redux, redux_files
from difftool.plugins.builtin.flow.tokenizers import clip_tokenizer, t5_tokenizer
from difftool.plugins.registry import build_registry

from . import tiny

SEED, STEPS, SIZE, PROMPT = 7, 3, (32, 32), "a lighthouse at dusk"
#: The tiny SigLIP: 24 wide (Redux's 1152), 128 px images in 8 px patches (256 image tokens).
SIGLIP_WIDTH, SIGLIP_SIDE = 24, 128


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def siglip(width: int = SIGLIP_WIDTH, seed: int = 11) -> Any:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=width, intermediate_size=40, num_hidden_layers=2, num_attention_heads=1,
                                image_size=SIGLIP_SIDE, patch_size=8)  # fmt: skip
    return SiglipVisionModel(config).eval()


def comfy_state(encoder: Any, head: bool = True) -> dict[str, torch.Tensor]:
    """A SigLIP's weights as ComfyUI's sigclip_vision_patch14_384 keeps them: ``vision_model.*``."""
    state = {k.removeprefix("vision_model."): v for k, v in encoder.state_dict().items()}
    return {"vision_model." + k: v for k, v in state.items() if head or not k.startswith("head.")}


def projector(width: int = SIGLIP_WIDTH, tokens: int = 32, seed: int = 12) -> Any:
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    torch.manual_seed(seed)
    embedder = ReduxImageEncoder(redux_dim=width, txt_in_features=tokens).eval()
    with torch.no_grad():  # tokens as strong as the tiny T5's (std ~1), so 256 of them tell among 512
        embedder.redux_down.weight.mul_(10)
    return embedder


def painting(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:40, 0:50]
    base = np.stack([np.sin(x / (4 + seed)), np.cos(y / 3), (x * y) % 7 / 7], axis=-1) * 120 + 100
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Flux dev twice: ComfyUI's layout (with models/style_models and models/clip_vision beside it, the
    SigLIP file without its pooling head) and diffusers' (with a FLUX.1-Redux-dev folder)."""
    root = tmp_path_factory.mktemp("redux")
    parts, encoder, embedder = tiny.flux(seed=2), siglip(), projector()
    comfy = tiny.save_flux_comfy(parts, root / "comfy")
    models = root / "comfy" / "models"
    tiny.save(embedder.state_dict(), models / "style_models" / "flux1-redux-dev.safetensors")
    tiny.save(comfy_state(encoder, head=False), models / "clip_vision" / "sigclip_vision_patch14_384.safetensors")
    redux_folder = root / "FLUX.1-Redux-dev"
    embedder.save_pretrained(redux_folder / "image_embedder", safe_serialization=True)
    encoder.save_pretrained(redux_folder / "image_encoder", safe_serialization=True)
    refs = [painting(root / "refs" / "a.png", 1), painting(root / "refs" / "b.png", 2)]
    return {"parts": parts, "encoder": encoder, "embedder": embedder, "comfy": comfy, "redux_folder": redux_folder,
            "folder": tiny.save_folder(parts, root / "flux-folder"), "refs": refs, "root": root}  # fmt: skip


def ours(model: Path, **params: Any) -> api.RunResult:
    run = {"prompt": PROMPT, "width": SIZE[0], "height": SIZE[1], "steps": STEPS, "guidance_scale": 3.5, **params}
    return api.run("generate", model=str(model), seed=SEED, dtype="fp32", **run)


def diffusers_redux(flux: dict[str, Any], images: list[Path], weight: float = 1.0) -> Image.Image:
    """FluxPriorReduxPipeline -> FluxPipeline(prompt_embeds=..., pooled_prompt_embeds=...). One image: the
    prior encodes the prompt itself. Several: per-image scales 1 / n (their tokens averaged, the prompt as
    written). A weight: log(weight) on the Redux tokens' attention logits, as diffusers' own attention_mask."""
    import math

    from diffusers import FluxPipeline, FluxPriorReduxPipeline

    parts = flux["parts"]
    tokenizers = {"tokenizer": clip_tokenizer("clip_l"), "tokenizer_2": t5_tokenizer()}
    pipe = FluxPipeline(**parts, **tokenizers)
    prior = FluxPriorReduxPipeline(
        image_encoder=flux["encoder"], feature_extractor=redux.image_processor(SIGLIP_SIDE),
        image_embedder=flux["embedder"], text_encoder=parts["text_encoder"],
        text_encoder_2=parts["text_encoder_2"], **tokenizers,
    )  # fmt: skip
    pictures = [Image.open(p).convert("RGB") for p in images]
    if len(images) == 1:
        out = prior(pictures[0], prompt=PROMPT)
    else:
        n = len(images)
        t5, pooled, _ = pipe.encode_prompt(PROMPT, None, max_sequence_length=512)
        out = prior(pictures, prompt_embeds=t5.repeat(n, 1, 1), pooled_prompt_embeds=pooled.repeat(n, 1),
                    prompt_embeds_scale=[1.0 / n] * n, pooled_prompt_embeds_scale=[1.0 / n] * n)  # fmt: skip
    tokens = out.prompt_embeds.shape[1] - 512
    patch = pipe.vae_scale_factor * 2  # a latent token per 2 x 2 latent pixels
    latents = (SIZE[0] // patch) * (SIZE[1] // patch)
    bias = torch.zeros(1, 1, 1, 512 + tokens + latents)
    bias[..., 512 : 512 + tokens] = math.log(weight)
    return pipe(
        prompt_embeds=out.prompt_embeds, pooled_prompt_embeds=out.pooled_prompt_embeds, width=SIZE[0],
        height=SIZE[1], num_inference_steps=STEPS, guidance_scale=3.5, generator=torch.Generator().manual_seed(SEED),
        joint_attention_kwargs={"attention_mask": bias} if weight != 1.0 else None,
    ).images[0]  # fmt: skip


def test_comfyui_files_found_by_themselves_match_diffusers_redux(flux: dict[str, Any]) -> None:
    """flux1-redux-dev in models/style_models and the SigLIP in models/clip_vision: --reference alone."""
    result = ours(flux["comfy"], reference=[flux["refs"][0]], reference_weight=1.0)
    plain = ours(flux["comfy"]).images[0]
    assert max_diff(result.images[0], plain) > 5  # the reference changed the image
    assert max_diff(result.images[0], diffusers_redux(flux, flux["refs"][:1])) <= 2
    record = result.record
    assert record["reference"] == ["a.png"] and record["ip_adapter"] == "flux1-redux-dev"
    assert record["image_encoder"] == "sigclip_vision_patch14_384" and record["reference_weight"] == 1.0


def test_a_reference_sent_inline_runs_as_its_file_does(flux: dict[str, Any]) -> None:
    """A server decodes a request's ``{"image": base64}`` reference into an image in memory: Redux takes it
    as it takes the file (found by review: it called ``.stat()`` on it), and records no name for it."""
    from difftool.core.images import open_image

    by_path = ours(flux["comfy"], reference=[flux["refs"][0]], reference_weight=1.0)
    inline = ours(flux["comfy"], reference=[open_image(flux["refs"][0])], reference_weight=1.0)
    assert max_diff(inline.images[0], by_path.images[0]) == 0
    assert inline.record["reference"] == ["<image>"]


@pytest.mark.slow  # six runs of the tiny Flux
def test_a_folder_of_references_and_a_weight_match_diffusers(flux: dict[str, Any]) -> None:
    """diffusers' layout: FLUX.1-Redux-dev's folder as --ip-adapter, two references averaged, weight 0.5."""
    folder = flux["refs"][0].parent
    run = {"reference": [folder], "ip_adapter": str(flux["redux_folder"])}
    result = ours(flux["folder"], reference_weight=0.5, **run)
    assert max_diff(result.images[0], diffusers_redux(flux, flux["refs"], 0.5)) <= 2
    assert max_diff(result.images[0], ours(flux["folder"], reference_weight=1.0, **run).images[0]) > 2
    assert result.record["reference"] == ["a.png", "b.png"] and result.record["image_encoder"] == "image_encoder"
    # weight 0: the tokens take no attention, the image is the prompt's alone; the cached model is left plain
    plain = ours(flux["folder"]).images[0]
    assert max_diff(ours(flux["folder"], reference_weight=0.0, **run).images[0], plain) == 0
    assert max_diff(ours(flux["folder"]).images[0], plain) == 0


def test_single_files_load_as_the_modules_they_were_saved_from(flux: dict[str, Any]) -> None:
    models = flux["comfy"].parents[1]
    file = models / "clip_vision" / "sigclip_vision_patch14_384.safetensors"
    loaded = redux_files.load_encoder(file, Path("flux1-redux-dev.safetensors"), SIGLIP_WIDTH)
    assert loaded.config.image_size == SIGLIP_SIDE and loaded.config.num_hidden_layers == 2
    pixels = torch.randn(1, 3, SIGLIP_SIDE, SIGLIP_SIDE)
    with torch.no_grad():
        ours_out, theirs = loaded(pixel_values=pixels), flux["encoder"](pixel_values=pixels)
    assert torch.equal(ours_out.last_hidden_state, theirs.last_hidden_state)
    embedder = redux_files.load_projector(models / "style_models" / "flux1-redux-dev.safetensors")
    expected = flux["embedder"].state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in embedder.state_dict().items())


def test_the_references_are_encoded_once_for_a_whole_job(flux: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    encode = redux.encode
    monkeypatch.setattr(redux, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    ref = painting(flux["root"] / "once" / "c.png", 3)
    first = api.run("generate", model=str(flux["comfy"]), prompt=PROMPT, width=32, height=32, steps=2, seed=1,
                    dtype="fp32", reference=[ref])  # fmt: skip
    second = api.run("generate", model=str(flux["comfy"]), prompt=PROMPT, width=32, height=32, steps=2, seed=2,
                     dtype="fp32", reference=[ref])  # fmt: skip
    assert len(calls) == 1
    assert max_diff(first.images[0], second.images[0]) > 0  # two images, one encoding


def test_cli_style_with_a_reference_and_no_prompt_records_it(flux: dict[str, Any], tmp_path: Path) -> None:
    photo = painting(tmp_path / "photo.png", 5)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.cli, [
        "run", "style", str(photo), "--model", str(flux["comfy"]), "--reference", str(flux["refs"][1]),
        "--steps", "2", "--seed", "3", "--dtype", "fp32", "-o", str(out),
    ], obj=build_registry(entry_points=False))  # fmt: skip
    assert result.exit_code == 0, result.output
    written = next(out.glob("*.png"))
    assert Image.open(written).size == (50, 40)
    meta = read_metadata(written)["difftool"]
    assert meta["reference"] == ["b.png"] and meta["ip_adapter"] == "flux1-redux-dev"
    assert meta["reference_weight"] == 0.6 and meta["model_family"] == "flux"


def test_modes_and_sd3_are_refused_in_one_line(flux: dict[str, Any], tmp_path: Path) -> None:
    ref = [flux["refs"][0]]
    with pytest.raises(ParameterError, match="--reference-mode style is not supported for Flux"):
        ours(flux["comfy"], reference=ref, reference_mode="style")
    sd3 = tiny.save_folder(tiny.sd3(seed=1), tmp_path / "sd3")
    with pytest.raises(ParameterError, match="--reference is not supported for Stable Diffusion 3"):
        api.run("generate", model=str(sd3), prompt=PROMPT, width=32, height=32, steps=1, dtype="fp32", reference=ref)


def test_wrong_files_are_refused_naming_both(
    flux: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = [flux["refs"][0]]
    model = flux["folder"]  # nothing beside it: every file named
    monkeypatch.setenv("DIFFTOOL_MODELS", str(tmp_path / "empty"))
    with pytest.raises(ParameterError, match="Redux model") as error:
        ours(model, reference=ref)
    assert "models/style_models" in error.value.fix
    redux_file = tiny.save(flux["embedder"].state_dict(), tmp_path / "flux1-redux-dev.safetensors")
    clip_vit = _clip_file(tmp_path / "clip-vit.safetensors")
    narrow = tiny.save(comfy_state(siglip(16)), tmp_path / "siglip-16.safetensors")
    cases = {
        "ip-adapter_sd15.safetensors": {"ip_adapter": tiny.save({"image_proj.proj.weight": torch.zeros(4, 4),
                                        "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4)},
                                        tmp_path / "ip-adapter_sd15.safetensors")},  # fmt: skip
        "redux-wide.safetensors": {"ip_adapter": tiny.save(projector(tokens=64).state_dict(),
                                   tmp_path / "redux-wide.safetensors")},  # fmt: skip
        "clip-vit.safetensors": {"ip_adapter": redux_file, "image_encoder": clip_vit},
        "siglip-16.safetensors": {"ip_adapter": redux_file, "image_encoder": narrow},
    }  # fmt: skip
    for name, files in cases.items():
        with pytest.raises(DifftoolError) as error:
            ours(model, reference=ref, **{k: str(v) for k, v in files.items()})
        message = str(error.value)
        other = "flux-folder" if "image_encoder" not in files else "flux1-redux-dev.safetensors"
        assert name in message and other in message, message
        assert "\n" not in message
    # a SigLIP of the wrong width is passed over when looking, and the message lists what was found
    (tmp_path / "empty" / "clip_vision").mkdir(parents=True)
    tiny.save(comfy_state(siglip(16)), tmp_path / "empty" / "clip_vision" / "siglip-16.safetensors")
    with pytest.raises(DifftoolError, match=r"no SigLIP image encoder 24 wide .*found: siglip-16.safetensors"):
        ours(model, reference=ref, ip_adapter=str(redux_file))


def _clip_file(path: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=24, intermediate_size=37, projection_dim=16, num_hidden_layers=1,
                              num_attention_heads=1, image_size=32, patch_size=8)  # fmt: skip
    return tiny.save(CLIPVisionModelWithProjection(config).state_dict(), path)
