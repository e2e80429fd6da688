"""Offline loading: tokenizers, family detection, single files, pickles, and what bad files say."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from difftool.app import api
from difftool.core.errors import ModelError
from difftool.plugins.builtin.sd import checkpoint, loader
from difftool.plugins.builtin.sd.families import FAMILIES, detect_family
from difftool.plugins.builtin.sd.tokenizer import clip_tokenizer

from . import tiny


def test_clip_tokenizers_are_built_offline_from_the_bpe_file() -> None:
    ids = clip_tokenizer("clip")("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:] == [49407] * 70 and len(ids) == 77
    openclip = clip_tokenizer("openclip")("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert openclip[:7] == ids[:7] and openclip[7:] == [0] * 70  # SD 2.x / SDXL pad with "!"
    assert len(clip_tokenizer().get_vocab()) == 49408


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_detected_from_original_key_layout(name: str) -> None:
    """Full-size shapes of every family (meta tensors) -> detected family; diffusers maps them back."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    family = FAMILIES[name]
    config = family.config("unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    original = tiny.ldm_unet_keys(unet.state_dict(), config)
    assert detect_family({k: tuple(v.shape) for k, v in original.items()}) is family
    # The shipped config and the original layout agree: diffusers' converter recovers every weight.
    converted = convert_ldm_unet_checkpoint(original, config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in unet.state_dict().items()
    }


def test_unknown_checkpoint_names_what_it_found(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    with pytest.raises(ModelError, match=r"no Stable Diffusion U-Net: found 1 tensors \(lora.*--lora"):
        loader.load_sd_model(lora)
    odd = {  # a refiner's width without SDXL's added (pooled text + size) embedding
        "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (768, 1280),
    }
    with pytest.raises(ModelError, match="1280-wide cross-attention, not a supported family"):
        detect_family(odd)
    with pytest.raises(ModelError, match="8 input channels"):
        detect_family(
            {
                "model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3),
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            }
        )


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return tiny.components(seed=5)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_single_file_loads_with_identical_weights_and_outputs(kind: str, tmp_path: Path) -> None:
    parts = tiny.components(seed=5, sd2=kind == "sd2", xl=kind == "sdxl")
    folder = tiny.save_folder(parts, tmp_path / "folder")
    single = tiny.save_single_file(parts, tmp_path / "tiny.safetensors")
    model = loader.load_sd_model(single)
    loaded = {"unet": model.unet, "vae": model.vae}
    loaded.update(zip(model.family.text_encoders, model.text_encoders, strict=True))
    for name, module in loaded.items():
        expected, got = parts[name].state_dict(), module.state_dict()
        assert expected.keys() == got.keys(), name
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    common = dict(prompt="a lighthouse", width=32, height=32, steps=3, seed=11, dtype="fp32", scheduler="euler-a")
    a = api.run("generate", model=str(folder), **common)
    b = api.run("generate", model=str(single), **common)
    # Same weights; SDXL's text projection arrives transposed-and-copied, so its matmul may round differently.
    diff = np.abs(np.asarray(a.images[0], np.int16) - np.asarray(b.images[0], np.int16)).max()
    assert diff <= (1 if kind == "sdxl" else 0)
    assert b.record["model"] == "tiny" and len(b.record["model_hash"]) == 10
    assert a.record["model_family"] == b.record["model_family"] == kind


class WritesAFile:
    """A pickle whose loading would create a file: the classic malicious .ckpt."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.target, "pwned"))


def test_pickles_are_refused_and_never_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    victim = tmp_path / "victim.txt"
    ckpt = tmp_path / "evil.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": {"x": WritesAFile(victim)}}))
    with pytest.raises(ModelError, match=r"evil.ckpt is a pickle file.*--allow-pickle"):
        loader.load_sd_model(ckpt)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ModelError, match="cannot be loaded safely"):
        checkpoint.load_state_dict(ckpt, allow_pickle=True)
    assert not victim.exists()


def test_allow_pickle_loads_a_plain_tensor_checkpoint(parts: dict, tmp_path: Path) -> None:
    single = tiny.save_single_file(parts, tmp_path / "tiny.safetensors")
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(single))}, ckpt)
    os.rename(single.with_name("tiny.safetensors.diffusers"), ckpt.with_name("tiny.ckpt.diffusers"))
    model = loader.load_sd_model(ckpt, allow_pickle=True)
    assert model.family.name == "sd1"
    assert torch.equal(model.unet.conv_in.weight, parts["unet"].conv_in.weight)


def test_bin_only_folder_is_refused_unless_opted_in(parts: dict, tmp_path: Path) -> None:
    folder = tiny.save_folder(parts, tmp_path / "folder")
    for weights in folder.glob("*/*.safetensors"):
        state = __import__("safetensors.torch").torch.load_file(str(weights))
        name = "pytorch_model.bin" if weights.parent.name == "text_encoder" else "diffusion_pytorch_model.bin"
        torch.save(state, weights.with_name(name))
        weights.unlink()
    with pytest.raises(ModelError, match=r"only pickle \(.bin\) weights"):
        loader.load_sd_model(folder)
    assert loader.load_sd_model(folder, allow_pickle=True).family.name == "sd1"


def test_mismatched_weights_name_the_key_and_both_shapes(parts: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    vae = tmp_path / "vae.safetensors"
    save_file(dict(parts["vae"].state_dict()), str(vae))  # a tiny VAE is not an SD 1.x VAE
    with pytest.raises(ModelError, match=r"weight \S+ has shape \(\d+[\d, ]*\), the model expects \(\d+"):
        loader.load_vae(vae, FAMILIES["sd1"], allow_pickle=False)


def test_with_both_formats_only_safetensors_are_read(parts: dict, tmp_path: Path) -> None:
    folder = tiny.save_folder(parts, tmp_path / "folder")
    victim = tmp_path / "victim.txt"
    for sub in ("unet", "vae"):  # a hostile pickle beside each safetensors file
        (folder / sub / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(WritesAFile(victim)))
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(pickle.dumps(WritesAFile(victim)))
    model = loader.load_sd_model(folder, allow_pickle=True)
    assert torch.equal(model.unet.conv_in.weight, parts["unet"].conv_in.weight)
    assert not victim.exists()


def test_model_names_never_escape_the_model_folders(tmp_path: Path, monkeypatch) -> None:
    from difftool.core.task import RunContext
    from difftool.plugins.builtin.sd.models import resolve_path
    from difftool.plugins.registry import build_registry

    root, outside = tmp_path / "models", tmp_path / "secret.safetensors"
    root.mkdir()
    outside.write_bytes(b"\0" * 16)
    monkeypatch.setenv("DIFFTOOL_MODELS", str(root))
    monkeypatch.chdir(root)  # relative to here, "../secret.safetensors" is a real path; as a *name* it is not
    context = RunContext(registry=build_registry(entry_points=False))
    for name in ("../secret", "../../secret", "models/../secret"):
        with pytest.raises(ModelError, match="not found"):
            resolve_path(name, context)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_shipped_vae_and_text_encoder_configs_fit_the_original_layout(name: str) -> None:
    """Full-size VAE and text encoders of each family (meta tensors) survive the original-layout round trip."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    family = FAMILIES[name]

    def shapes(state: dict) -> dict:
        return {k: tuple(v.shape) for k, v in state.items()}

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(family.config("vae"))
        encoders = [
            (CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel)(
                CLIPTextConfig(**family.config(part))
            )
            for part in family.text_encoders
        ]
    original = tiny.ldm_vae_keys(vae.state_dict(), dict(vae.config))
    assert shapes(convert_ldm_vae_checkpoint(original, dict(vae.config))) == shapes(vae.state_dict())
    for part, encoder in zip(family.text_encoders, encoders, strict=True):
        expected = {k.removeprefix("text_model."): v for k, v in shapes(encoder.state_dict()).items()}
        if family.tokenizers[family.text_encoders.index(part)] == "clip":
            prefix = "conditioner.embedders.0.transformer." if family.xl else "cond_stage_model.transformer."
            converted = convert_ldm_clip_checkpoint(tiny.ldm_clip_keys(encoder.state_dict(), prefix), prefix)
        else:
            prefix = "conditioner.embedders.1.model." if family.xl else "cond_stage_model.model."
            original_text = tiny.ldm_openclip_keys(encoder.state_dict(), prefix)
            converted = convert_open_clip_checkpoint(encoder, original_text, prefix=prefix)
        got = {k.removeprefix("text_model."): v for k, v in shapes(converted).items()}
        assert got == expected, (name, part)
