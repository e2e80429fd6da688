"""IP-Adapter (--reference) in ``inpaint`` and ``upscale-sd``, and in the PNG's A1111 text (written, read back)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from difftool.app import api
from difftool.core.errors import DifftoolError

from . import tiny, tiny_ipa
from .test_parity import STEPS, generator, hole_mask, max_diff, photo, reference_scheduler

SEED = 3


def _adapter_beside_encoder(parts: dict[str, Any], root: Path, seed: int) -> Path:
    tiny_ipa.image_encoder(seed=seed).save_pretrained(root / "ipa" / "image_encoder", safe_serialization=True)
    return tiny_ipa.save_adapter(
        tiny_ipa.adapter(parts["unet"], seed=seed), root / "ipa" / "ip-adapter_tiny.safetensors"
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny base and a tiny 9-channel inpainting model, each with its adapter (encoder beside it); a reference."""
    root = tmp_path_factory.mktemp("ipa-tasks")
    reference = root / "painting.png"
    photo((50, 40)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(reference)
    out: dict[str, Any] = {"reference": reference, "root": root}
    for kind, channels, seed in (("base", 4, 2), ("nine", 9, 1)):
        parts = tiny.components(in_channels=channels, seed=seed)
        folder = root / kind
        out[kind] = {
            "parts": parts,
            "folder": tiny.save_folder(parts, folder / "tiny-sd"),
            "adapter": _adapter_beside_encoder(parts, folder, seed + 10),
        }
    return out


def _inpaint(model: dict[str, Any], **params: Any) -> Image.Image:
    return api.run(
        "inpaint", photo(), model=str(model["folder"]), mask=hole_mask(), prompt="a red door", steps=STEPS,
        guidance_scale=7.5, scheduler="ddim", seed=SEED, dtype="fp32", **params,
    ).images[0]  # fmt: skip


@pytest.mark.slow  # two of our runs and diffusers' pipeline with its adapter, per case
@pytest.mark.parametrize(("kind", "mode"), [("nine", "all"), ("base", "style")], ids=["inpainting-all", "base-style"])
def test_inpaint_with_a_reference_matches_diffusers_inpaint_pipeline_with_load_ip_adapter(
    kind: str, mode: str, models: dict[str, Any]
) -> None:
    from diffusers import StableDiffusionInpaintPipeline

    model = models[kind]
    ref_params = {"reference": [models["reference"]], "ip_adapter": str(model["adapter"]), "reference_weight": 0.8}
    ours = _inpaint(model, **ref_params, reference_mode=mode)
    pipe = StableDiffusionInpaintPipeline(
        **{**model["parts"], "scheduler": reference_scheduler("ddim")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    adapter = model["adapter"]
    pipe.load_ip_adapter(
        str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder="image_encoder"
    )
    # The tiny U-Net's InstantStyle blocks (attention in up block 0), as test_ip_adapter's.
    pipe.set_ip_adapter_scale({"up": {"block_0": [0.0, 0.8, 0.0]}} if mode == "style" else 0.8)
    try:
        ref = pipe(
            "a red door", image=photo(), mask_image=hole_mask(), negative_prompt="", width=64, height=48,
            strength=1.0, num_inference_steps=STEPS, guidance_scale=7.5, generator=generator(),
            ip_adapter_image=Image.open(models["reference"]),
        ).images[0]  # fmt: skip
    finally:
        pipe.unload_ip_adapter()  # the parts' U-Net is shared with the other tests
    inside = np.asarray(hole_mask()) > 0
    ours_px, ref_px = np.asarray(ours, dtype=np.int16), np.asarray(ref, dtype=np.int16)
    assert np.abs(ours_px[inside] - ref_px[inside]).max() <= 2
    plain = np.asarray(_inpaint(model), dtype=np.int16)
    assert np.abs(ours_px[inside] - plain[inside]).max() > 2  # the reference changed the repainted area
    assert np.array_equal(ours_px[~inside], np.asarray(photo(), dtype=np.int16)[~inside])  # the rest: the input's


def test_inpaint_with_a_reference_needs_a_stable_diffusion_model(models: dict[str, Any]) -> None:
    with pytest.raises(DifftoolError, match="Stable Diffusion"):
        api.run("inpaint", photo(), mask=hole_mask(), reference=[models["reference"]], ip_adapter="x.safetensors")


def _upscale(model: dict[str, Any], **params: Any) -> Any:
    common = {"model": str(model["folder"]), "prompt": "a field", "scale": 2.0, "upscaler": "lanczos", "tile": 48}
    common |= {"overlap": 16, "strength": 0.5, "steps": 2, "seed": 2, "dtype": "fp32"}
    return api.run("upscale-sd", photo((40, 24)), **common, **params)


def test_upscale_sd_applies_the_reference_to_every_tile_encoding_it_once(
    models: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from difftool.plugins.builtin.sd import ip_adapter_run

    calls: list[int] = []
    tokens: list[int] = []
    encode = ip_adapter_run.encode
    monkeypatch.setattr(ip_adapter_run, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    init = ip_adapter_run.ReferencedDenoiser.__init__
    monkeypatch.setattr(
        ip_adapter_run.ReferencedDenoiser, "__init__", lambda self, *a: tokens.append(1) or init(self, *a)
    )
    reference = tmp_path / "fresh.png"  # not encoded by another test yet
    photo((30, 30)).save(reference)
    model = models["base"]
    plain = _upscale(model).images[0]
    result = _upscale(model, reference=[reference], ip_adapter=str(model["adapter"]), reference_weight=1.0)
    assert result.images[0].size == (80, 48) and result.record["tiles"] == 2
    assert len(calls) == 1 and len(tokens) == 2  # encoded once, its tokens in each tile
    assert max_diff(result.images[0], plain) > 2
    assert result.record["reference"] == ["fresh.png"] and result.record["reference_weight"] == 1.0


def test_the_reference_is_written_as_an_a1111_ip_adapter_unit_and_read_back(models: dict[str, Any]) -> None:
    from difftool.core.metadata import format_parameters, params_from_a1111, parse_parameters

    model = models["base"]
    result = api.run(
        "generate", model=str(model["folder"]), prompt="a lighthouse", width=64, height=48, steps=2, seed=1,
        dtype="fp32", reference=[models["reference"]], ip_adapter=str(model["adapter"]), reference_weight=0.7,
        reference_mode="composition",
    )  # fmt: skip
    text = format_parameters(result.record)
    digest = result.record["ip_adapter_hash"][:8]
    assert (
        f'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: ip-adapter_tiny [{digest}], Weight: 0.7, '
        "Resize Mode: Crop and Resize, Guidance Start: 0, Guidance End: 1, Control Mode: Balanced, "
        'Reference Mode: composition"' in text
    )
    restored = params_from_a1111(parse_parameters(text))
    assert restored["ip_adapter"] == "ip-adapter_tiny" and restored["reference_weight"] == 0.7
    assert restored["reference_mode"] == "composition" and "control" not in restored
    assert "reference" not in restored  # the image is not in the PNG: pass it again


def test_an_a1111_ip_adapter_unit_beside_a_controlnet_unit_is_read_apart() -> None:
    from difftool.core.metadata import params_from_a1111, parse_parameters

    text = (
        'a cat\nSteps: 20, Seed: 1, ControlNet 0: "Module: canny, Model: cn-edges [12345678], Weight: 1, '
        'Guidance Start: 0, Guidance End: 1", ControlNet 1: "Module: ip-adapter_clip_sdxl_plus_vith, '
        'Model: ip-adapter-plus_sdxl_vit-h [6a3f6166], Weight: 0.5, Resize Mode: Crop and Resize"'
    )
    restored = params_from_a1111(parse_parameters(text))
    assert restored["control"] == ["cn-edges,pre=canny,weight=1,start=0,end=1"]
    assert restored["ip_adapter"] == "ip-adapter-plus_sdxl_vit-h" and restored["reference_weight"] == 0.5
    assert restored["reference_mode"] == "all"
