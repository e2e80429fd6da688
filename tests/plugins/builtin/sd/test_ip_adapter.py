"""IP-Adapter (--reference) equals diffusers' load_ip_adapter + set_ip_adapter_scale on tiny weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from difftool.app import api
from difftool.core.errors import DifftoolError

from . import tiny, tiny_ipa
from .test_parity import SEED, generator, max_diff, photo, reference_scheduler

STEPS = 4
SIZE = (64, 48)
#: diffusers' InstantStyle dicts for the tiny U-Net (attention in up block 0 and down block 1).
INSTANT = {"style": {"up": {"block_0": [0.0, 0.8, 0.0]}}, "composition": {"down": {"block_1": [0.0, 0.8]}}}


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny SD 1.x folder; a plain adapter with its encoder beside it (h94's layout); a reference."""
    root = tmp_path_factory.mktemp("ipa")
    parts = tiny.components(seed=2)
    encoder = tiny_ipa.image_encoder(seed=4)
    encoder.save_pretrained(root / "ipa" / "image_encoder", safe_serialization=True)
    reference = root / "painting.png"
    photo((50, 40)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(reference)
    return {
        "parts": parts,
        "folder": tiny.save_folder(parts, root / "tiny-sd"),
        "encoder": encoder,
        "adapter": tiny_ipa.save_adapter(tiny_ipa.adapter(parts["unet"]), root / "ipa" / "ip-adapter_tiny.safetensors"),
        "plus": tiny_ipa.save_adapter(
            tiny_ipa.plus_adapter(parts["unet"], seed=3), root / "ipa" / "ip-adapter-plus_tiny.safetensors"
        ),
        "reference": reference,
        "root": root,
    }


def ours(sd: dict[str, Any], **params: Any) -> Any:
    defaults = dict(prompt="a lighthouse", negative_prompt="fog", steps=STEPS, guidance_scale=6.0, seed=SEED)
    return api.run("generate", model=str(sd["folder"]), width=SIZE[0], height=SIZE[1], dtype="fp32",
                   scheduler="ddim", **{**defaults, **params})  # fmt: skip


def diffusers_reference(sd: dict[str, Any], adapter: Path, scale: Any) -> Image.Image:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **{**sd["parts"], "scheduler": reference_scheduler("ddim")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_ip_adapter(
        str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder="image_encoder"
    )
    pipe.set_ip_adapter_scale(scale)
    try:
        return pipe(
            "a lighthouse", negative_prompt="fog", width=SIZE[0], height=SIZE[1], num_inference_steps=STEPS,
            guidance_scale=6.0, generator=generator(), ip_adapter_image=Image.open(sd["reference"]),
        ).images[0]  # fmt: skip
    finally:
        pipe.unload_ip_adapter()  # the parts' U-Net is shared with the other tests


@pytest.mark.parametrize("kind", ["adapter", "plus"])
@pytest.mark.parametrize("mode", ["all", "style", "composition"])
def test_reference_matches_diffusers_ip_adapter(kind: str, mode: str, sd: dict[str, Any]) -> None:
    result = ours(sd, reference=[sd["reference"]], ip_adapter=str(sd[kind]), reference_weight=0.8,
                  reference_mode=mode)  # fmt: skip
    ref = diffusers_reference(sd, sd[kind], INSTANT.get(mode, 0.8))
    plain = ours(sd).images[0]
    assert max_diff(result.images[0], plain) > 2  # the reference changed the image
    assert max_diff(result.images[0], ref) <= 2
    record = result.record
    assert record["reference"] == ["painting.png"] and record["ip_adapter"] == sd[kind].stem
    assert record["reference_mode"] == mode and record["reference_weight"] == 0.8
    assert record["image_encoder"] == "image_encoder"


def test_the_u_net_is_left_as_it_was_and_a_folder_of_one_image_is_that_image(sd: dict[str, Any]) -> None:
    before = ours(sd).images[0]
    folder = sd["root"] / "refs"
    folder.mkdir(exist_ok=True)
    Image.open(sd["reference"]).save(folder / "only.png")
    by_folder = ours(sd, reference=[folder], ip_adapter=str(sd["adapter"]))
    by_file = ours(sd, reference=[sd["reference"]], ip_adapter=str(sd["adapter"]))
    assert max_diff(by_folder.images[0], by_file.images[0]) == 0
    assert max_diff(ours(sd).images[0], before) == 0  # no adapter left on the cached model


def test_adapter_by_name_and_single_file_encoder_from_the_model_roots(
    sd: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ComfyUI's layout: models/ipadapter/NAME.safetensors, models/clip_vision/ENCODER.safetensors."""
    tiny_ipa.save_adapter(tiny_ipa.adapter(sd["parts"]["unet"]), tmp_path / "models/ipadapter/style-sd15.safetensors")
    tiny_ipa.save_encoder_file(sd["encoder"], tmp_path / "models/clip_vision/tiny-vit.safetensors")
    monkeypatch.setenv("DIFFTOOL_MODELS", str(tmp_path))
    by_name = ours(sd, reference=[sd["reference"]], ip_adapter="style-sd15")
    by_path = ours(sd, reference=[sd["reference"]], ip_adapter=str(sd["adapter"]))
    assert max_diff(by_name.images[0], by_path.images[0]) == 0
    assert by_name.record["image_encoder"] == "tiny-vit"


def test_wrong_pairings_are_refused_naming_both_files(sd: dict[str, Any], tmp_path: Path) -> None:
    xl_unet = tiny.components(xl=True)["unet"]
    xl = tiny_ipa.save_adapter(tiny_ipa.adapter(xl_unet), tmp_path / "ip-adapter_sdxl.safetensors")
    with pytest.raises(DifftoolError) as error:
        ours(sd, reference=[sd["reference"]], ip_adapter=str(xl))
    assert "ip-adapter_sdxl.safetensors" in str(error.value) and "tiny-sd" in str(error.value)
    # an adapter over 24-wide embeds with a 16-wide encoder
    wide = tiny_ipa.save_adapter(tiny_ipa.adapter(sd["parts"]["unet"], embed_dim=24), tmp_path / "wide.safetensors")
    encoder = tiny_ipa.save_encoder_file(sd["encoder"], tmp_path / "vit16.safetensors")
    with pytest.raises(DifftoolError) as error:
        ours(sd, reference=[sd["reference"]], ip_adapter=str(wide), image_encoder=str(encoder))
    assert "wide.safetensors" in str(error.value) and "vit16.safetensors" in str(error.value)


def test_reference_needs_an_adapter_and_the_torch_backend(sd: dict[str, Any]) -> None:
    from types import SimpleNamespace

    from difftool.plugins.builtin.sd import ip_adapter

    with pytest.raises(DifftoolError, match="--ip-adapter"):
        ours(sd, reference=[sd["reference"]])
    with pytest.raises(DifftoolError, match="--reference"):
        ours(sd, ip_adapter=str(sd["adapter"]))
    for name in ("onnx", "tensorrt"):
        with pytest.raises(DifftoolError, match="torch backend only"):
            ip_adapter.check_backend({"reference": (sd["reference"],)}, SimpleNamespace(name=name))
    ip_adapter.check_backend({"reference": ()}, SimpleNamespace(name="onnx"))  # no reference: nothing to refuse


def test_cli_style_with_a_reference_and_no_prompt(
    sd: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from difftool import cli
    from difftool.core.images import read_metadata
    from difftool.plugins.registry import build_registry

    registry = build_registry(entry_points=False)
    source = tmp_path / "photo.png"
    photo(SIZE).save(source)
    out = tmp_path / "out.png"
    args = ["run", "style", str(source), "--model", str(sd["folder"]), "--steps", "3",
            "--reference", str(sd["reference"]), "--ip-adapter", str(sd["adapter"]), "--reference-weight", "0.7",
            "--reference-mode", "style", "--dtype", "fp32", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(cli.cli, args, obj=registry)
    assert result.exit_code == 0, result.output
    recorded = read_metadata(out)["difftool"]
    assert recorded["reference"] == ["painting.png"] and recorded["reference_mode"] == "style"
    assert recorded["reference_weight"] == 0.7 and recorded["ip_adapter"] == "ip-adapter_tiny"
    assert np.asarray(Image.open(out)).std() > 1


@pytest.fixture(scope="module")
def xl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny SDXL folder; a plain and a Plus adapter sharing an encoder beside them."""
    root = tmp_path_factory.mktemp("ipa-xl")
    parts = tiny.components(xl=True, seed=3)
    tiny_ipa.image_encoder(seed=5).save_pretrained(root / "ipa" / "image_encoder", safe_serialization=True)
    reference = root / "painting.png"
    photo((40, 50)).transpose(Image.Transpose.ROTATE_180).save(reference)
    unet = parts["unet"]
    return {
        "parts": parts,
        "folder": tiny.save_folder(parts, root / "tiny-xl"),
        "plain": tiny_ipa.save_adapter(tiny_ipa.adapter(unet, seed=1), root / "ipa" / "ip-adapter_xl.safetensors"),
        "plus": tiny_ipa.save_adapter(
            tiny_ipa.plus_adapter(unet, seed=2), root / "ipa" / "ip-adapter-plus_xl.safetensors"
        ),
        "reference": reference,
    }


@pytest.mark.parametrize("kind", ["plain", "plus"])
@pytest.mark.parametrize("mode", ["all", "style", "composition"])
def test_sdxl_reference_matches_diffusers_ip_adapter(kind: str, mode: str, xl: dict[str, Any]) -> None:
    from diffusers import StableDiffusionXLPipeline

    adapter = xl[kind]
    result = api.run(
        "generate", model=str(xl["folder"]), prompt="a lighthouse", negative_prompt="fog", width=SIZE[0],
        height=SIZE[1], steps=STEPS, guidance_scale=6.0, seed=SEED, dtype="fp32", scheduler="ddim",
        reference=[xl["reference"]], ip_adapter=str(adapter), reference_weight=0.8, reference_mode=mode,
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(**{**xl["parts"], "scheduler": reference_scheduler("ddim")})
    pipe.load_ip_adapter(
        str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder="image_encoder"
    )
    pipe.set_ip_adapter_scale(INSTANT.get(mode, 0.8))
    try:
        ref = pipe(
            "a lighthouse", negative_prompt="fog", width=SIZE[0], height=SIZE[1], num_inference_steps=STEPS,
            guidance_scale=6.0, generator=generator(), ip_adapter_image=Image.open(xl["reference"]),
        ).images[0]  # fmt: skip
    finally:
        pipe.unload_ip_adapter()
    plain = api.run(
        "generate", model=str(xl["folder"]), prompt="a lighthouse", negative_prompt="fog", width=SIZE[0],
        height=SIZE[1], steps=STEPS, guidance_scale=6.0, seed=SEED, dtype="fp32", scheduler="ddim",
    ).images[0]  # fmt: skip
    assert max_diff(result.images[0], plain) > 2  # the reference changed the image
    assert max_diff(result.images[0], ref) <= 2


def test_the_reference_is_encoded_once_for_a_whole_job(
    sd: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not per step, nor per image: the embeddings are kept while the files stay the same."""
    from difftool.plugins.builtin.sd import ip_adapter_run

    calls = []
    encode = ip_adapter_run.encode
    monkeypatch.setattr(ip_adapter_run, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    reference = tmp_path / "fresh.png"
    photo((30, 30)).save(reference)
    first = ours(sd, reference=[reference], ip_adapter=str(sd["adapter"]), seed=1)
    second = ours(sd, reference=[reference], ip_adapter=str(sd["adapter"]), seed=2)
    assert len(calls) == 1
    assert max_diff(first.images[0], second.images[0]) > 0  # two images made, one encoding


def test_a_server_checks_every_reference_and_the_adapter_against_its_allowed_folders(
    sd: dict[str, Any], tmp_path: Path
) -> None:
    from difftool.plugins.builtin.sd.tasks import Style
    from difftool.serve.security import AccessDenied, PathPolicy, check_params

    policy = PathPolicy([sd["root"]])
    params = {"reference": [str(sd["reference"]), "refs"], "ip_adapter": str(sd["adapter"])}
    (sd["root"] / "refs").mkdir(exist_ok=True)
    checked = check_params(Style(), params, None, policy)
    assert checked["reference"] == [str(sd["reference"].resolve()), str((sd["root"] / "refs").resolve())]
    outside = tmp_path / "secret.png"
    photo((8, 8)).save(outside)
    with pytest.raises(AccessDenied):
        check_params(Style(), {**params, "reference": [str(outside)]}, None, policy)
    with pytest.raises(AccessDenied):
        check_params(Style(), {**params, "ip_adapter": str(outside)}, None, policy)


def test_out_of_memory_with_a_reference_is_one_line_not_a_sliced_wrong_image(
    sd: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from difftool.plugins.builtin.sd import ip_adapter_run

    def no_memory(*_: Any) -> Any:
        raise RuntimeError("CUDA out of memory")

    before = ours(sd).images[0]
    monkeypatch.setattr(ip_adapter_run.ReferencedDenoiser, "__call__", no_memory)
    with pytest.raises(DifftoolError, match="IP-Adapter has no sliced attention"):
        ours(sd, reference=[sd["reference"]], ip_adapter=str(sd["adapter"]))
    monkeypatch.undo()
    assert max_diff(ours(sd).images[0], before) == 0  # the U-Net's own processors back after the failure


def test_several_references_average_their_embeddings_as_diffusers_embeds_would(sd: dict[str, Any]) -> None:
    """Two references: the mean of diffusers' own image embeds, passed as ``ip_adapter_image_embeds``."""
    import torch
    from diffusers import StableDiffusionPipeline

    second = sd["root"] / "second.png"
    photo((32, 64)).save(second)
    result = ours(sd, reference=[sd["reference"], second], ip_adapter=str(sd["adapter"]), reference_weight=0.8)
    pipe = StableDiffusionPipeline(
        **{**sd["parts"], "scheduler": reference_scheduler("ddim")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    adapter = sd["adapter"]
    pipe.load_ip_adapter(
        str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder="image_encoder"
    )
    pipe.set_ip_adapter_scale(0.8)
    try:
        embeds = [pipe.encode_image(Image.open(p), "cpu", 1)[0] for p in (sd["reference"], second)]
        mean = torch.stack(embeds).mean(0)  # (1, 16)
        both = torch.stack([torch.zeros_like(mean), mean])  # negative first, as diffusers expects with CFG
        ref = pipe(
            "a lighthouse", negative_prompt="fog", width=SIZE[0], height=SIZE[1], num_inference_steps=STEPS,
            guidance_scale=6.0, generator=generator(), ip_adapter_image_embeds=[both],
        ).images[0]  # fmt: skip
    finally:
        pipe.unload_ip_adapter()
    one = ours(sd, reference=[sd["reference"]], ip_adapter=str(sd["adapter"]), reference_weight=0.8).images[0]
    assert max_diff(result.images[0], one) > 2  # the second image counted
    assert max_diff(result.images[0], ref) <= 2
    assert result.record["reference"] == ["painting.png", "second.png"]


def test_an_original_bin_loads_only_with_allow_pickle_and_equals_its_safetensors(sd: dict[str, Any]) -> None:
    """h94's .bin files: {"image_proj": {...}, "ip_adapter": {...}}, read with torch.load(weights_only=True)."""
    import torch
    from safetensors.torch import load_file

    flat = load_file(str(sd["adapter"]))
    nested: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        nested[head][rest] = value
    binary = sd["adapter"].with_name("ip-adapter_tiny_bin.bin")  # beside the encoder, like the safetensors
    torch.save(nested, binary)
    with pytest.raises(DifftoolError, match="pickle"):
        ours(sd, reference=[sd["reference"]], ip_adapter=str(binary))
    pickled = ours(sd, reference=[sd["reference"]], ip_adapter=str(binary), allow_pickle=True)
    safe = ours(sd, reference=[sd["reference"]], ip_adapter=str(sd["adapter"]))
    assert max_diff(pickled.images[0], safe.images[0]) == 0


def test_a1111_ip_adapter_units_are_not_controlnet_units() -> None:
    """They are the reference parameters (tests/serve/test_a1111_reference.py), never a --control."""
    from difftool.serve.a1111_controlnet import controlnet_units

    unit = {"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15 [6a3f6166]", "image": "..."}
    assert controlnet_units({"ControlNet": {"args": [unit]}}) == []


def test_hires_carries_the_reference_into_its_second_pass(
    sd: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from difftool.plugins.builtin.sd import ip_adapter_run

    passes, calls = [], []
    init = ip_adapter_run.ReferencedDenoiser.__init__
    monkeypatch.setattr(
        ip_adapter_run.ReferencedDenoiser, "__init__", lambda self, *a: passes.append(1) or init(self, *a)
    )
    encode = ip_adapter_run.encode
    monkeypatch.setattr(ip_adapter_run, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    reference = tmp_path / "for-hires.png"  # encoded by no other test
    photo((36, 28)).save(reference)
    result = ours(sd, reference=[reference], ip_adapter=str(sd["adapter"]), hires=1.5, hires_steps=2)
    assert result.images[0].size == (96, 72) and result.record["reference"] == ["for-hires.png"]
    assert len(passes) == 2  # the first pass and the hires pass both sample with the image tokens
    assert len(calls) == 1  # ... encoded once, for both
