"""generate's export shapes are declared against the resolved model, as its run sizes the image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difftool.core.models import ModelRef
from difftool.core.params import Params
from difftool.core.task import TaskRequest
from difftool.plugins.builtin.sd.families import UNET_ADD_EMBED, UNET_CONV_IN, UNET_PREFIX
from difftool.plugins.builtin.sd.loader import load_sd_model, native_size
from difftool.plugins.builtin.sd.tasks import Generate

from . import tiny

ATTN = UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"


def header_only(path: Path, xl: bool) -> Path:
    """A single-file checkpoint with only the tensors family detection reads (SD 1.x, or SDXL base)."""
    from safetensors.torch import save_file

    tensors = {UNET_CONV_IN: torch.zeros(320, 4, 3, 3, dtype=torch.float16)}
    tensors[ATTN] = torch.zeros(640, 2048 if xl else 768, dtype=torch.float16)
    if xl:
        tensors[UNET_ADD_EMBED] = torch.zeros(1280, 2816, dtype=torch.float16)
    save_file(tensors, str(path))
    return path


def shapes(model: str | None, **params: object):
    values = Params({p.name: p.default for p in Generate.params}).replace(prompt="x", **params)
    return Generate().export_shapes(TaskRequest({}, values, model))


def test_a_side_left_out_is_the_models_native_size(tmp_path: Path) -> None:
    xl, sd1 = header_only(tmp_path / "xl.safetensors", xl=True), header_only(tmp_path / "sd1.safetensors", xl=False)
    assert native_size(xl) == 1024 and native_size(sd1) == 512  # from the header: no weights are loaded
    assert shapes(ModelRef("xl", xl)).size == (8, 128, 128)  # 1024 px: 128 latents, as the run samples
    assert shapes(ModelRef("sd1", sd1)).size == (8, 64, 128)
    assert shapes(ModelRef("sd1", sd1), width=640).size == (8, 80, 128)  # a given side wins; the other is native
    assert shapes(None).size == (8, 64, 128)  # no model known (a bare request): 512, as before
    (tmp_path / "old.ckpt").write_bytes(b"\0")
    assert native_size(tmp_path / "old.ckpt") is None  # a pickle tells only when loaded: never unpickled for this


@pytest.mark.parametrize("xl", [False, True])
def test_the_declared_size_is_the_size_the_run_samples(tmp_path: Path, xl: bool) -> None:
    folder = tiny.save_folder(tiny.components(xl=xl, seed=3), tmp_path / "tiny")
    assert native_size(folder) == load_sd_model(folder).native_size  # the configs say what loading would
    side = native_size(folder) // 8
    assert shapes(ModelRef("tiny", folder)).size == (min(8, side), side, 128)
