"""A tiny LoRA changes difftool's output exactly as diffusers' own LoRA loading does (both file formats)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from difftool.app import api
from difftool.core.errors import ModelError

from . import tiny
from .test_parity import max_diff, reference_scheduler

pytest.importorskip("peft")


def make_lora(unet: Any, path: Path) -> Path:
    """A rank-4 LoRA on the attention projections, random (non-zero) weights, diffusers/peft format."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(unet)
    torch.manual_seed(9)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=get_peft_model_state_dict(unet), weight_name=path.name
    )
    return path


def to_kohya(peft_file: Path, path: Path) -> Path:
    """The same LoRA in kohya / A1111 naming: ``lora_unet_<module_path>.lora_down/lora_up/alpha``."""
    from safetensors.torch import load_file, save_file

    out = {}
    for key, value in load_file(str(peft_file)).items():
        module, _, kind = key.removeprefix("unet.").rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        if kind.startswith("A"):
            out[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))  # alpha = rank: scale 1
    save_file(out, str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora")
    parts = tiny.components(seed=6)
    lora = make_lora(parts["unet"], root / "detail.safetensors")
    return {
        "parts": parts,
        "folder": tiny.save_folder(parts, root / "model"),
        "peft": lora,
        "kohya": to_kohya(lora, root / "detail-kohya.safetensors"),
    }


GEN = dict(prompt="a lantern", width=32, height=32, steps=3, guidance_scale=5.0, scheduler="ddim", seed=4, dtype="fp32")


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_lora_matches_diffusers(fmt: str, setup: dict) -> None:
    from diffusers import StableDiffusionPipeline

    plain = api.run("generate", model=str(setup["folder"]), **GEN).images[0]
    ours = api.run("generate", model=str(setup["folder"]), lora=f"{setup[fmt]}:0.8", **GEN)
    parts = {k: copy.deepcopy(v) for k, v in setup["parts"].items()}
    pipe = StableDiffusionPipeline(
        **{**parts, "scheduler": reference_scheduler("ddim")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(setup["peft"]))
    ref = pipe(
        "a lantern",
        negative_prompt="",
        width=32,
        height=32,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(4),
        cross_attention_kwargs={"scale": 0.8},
    ).images[0]
    assert max_diff(ours.images[0], plain) > 2  # the LoRA changes the image
    assert max_diff(ours.images[0], ref) <= 1
    assert ours.record["loras"] == [f"{setup[fmt].stem}:0.8"]
    assert setup[fmt].stem in ours.record["lora_hashes"]


def test_lora_that_does_not_fit_is_a_clear_error(setup: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    not_lora = tmp_path / "weights.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(not_lora))
    with pytest.raises(ModelError, match="is not a LoRA"):
        api.run("generate", model=str(setup["folder"]), lora=str(not_lora), **GEN)
    assert np.asarray(api.run("generate", model=str(setup["folder"]), **GEN).images[0]).std() > 0


def test_lora_specs_parse_and_format_as_one_pair() -> None:
    """``--lora`` is parsed once (CLI, API, server, GUI alike); its text form reads back to the same specs."""
    from difftool.core.errors import ParameterError
    from difftool.plugins.builtin.sd.lora import LoraSpec, format_lora, parse_lora
    from difftool.plugins.builtin.sd.models import LOAD_PARAMS

    parsed = parse_lora(" ink.safetensors:0.7, C:/loras/pen.safetensors ,,dots:-0.25")
    assert parsed.specs == (
        LoraSpec("ink.safetensors", 0.7),
        LoraSpec("C:/loras/pen.safetensors"),
        LoraSpec("dots", -0.25),
    )
    assert parsed == format_lora(parsed.specs) == "ink.safetensors:0.7,C:/loras/pen.safetensors,dots:-0.25"
    assert parse_lora(str(parsed)).specs == parsed.specs and parse_lora(parsed) is parsed
    lora = next(p for p in LOAD_PARAMS if p.name == "lora")
    assert lora.validate("a:2").specs == (LoraSpec("a", 2.0),) and lora.validate(None) is None
    with pytest.raises(ParameterError, match="weight inf is not a finite number"):
        parse_lora("a:inf")
