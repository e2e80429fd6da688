"""VAE safety nets (NaN, tiling, fp16 upcast) and prediction-type overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from difftool.app import api
from difftool.core.task import RunContext
from difftool.plugins.builtin.sd import loader, pipeline
from difftool.plugins.registry import Registry

from . import tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_folder(tiny.components(seed=3), tmp_path_factory.mktemp("sd") / "model")


def test_nan_from_the_vae_is_an_error_and_nothing_is_written(folder: Path, tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from difftool import cli

    model = loader.load_sd_model(folder)
    monkeypatch.setattr(pipeline, "_vae_on", lambda m, c: _NanVae(model.vae))
    out = tmp_path / "x.png"
    result = CliRunner().invoke(
        cli.cli, ["run", "generate", "--model", str(folder), "--prompt", "x", "--width", "16", "--height", "16",
                  "--steps", "1", "-o", str(out)],
    )  # fmt: skip
    assert result.exit_code == 1 and "NaN or Inf" in result.stderr and "--dtype fp32" in result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


class _NanVae(torch.nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae
        self.config = vae.config

    def decode(self, z: torch.Tensor) -> Any:
        out = self.vae.decode(z)
        out.sample[..., 0, 0] = float("nan")
        return out

    def disable_tiling(self) -> None:
        pass


def test_large_images_decode_in_tiles(folder: Path, monkeypatch) -> None:
    model = loader.load_sd_model(folder)
    latents = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(0))
    context = RunContext(registry=Registry())  # no backend: the CPU in fp32
    whole = pipeline.decode_latents(model, latents, context)
    assert not model.vae.use_tiling
    monkeypatch.setattr(pipeline, "TILED_DECODE_PIXELS", 32 * 32)
    model.vae.tile_sample_min_size, model.vae.tile_latent_min_size = 32, 16
    tiled = pipeline.decode_latents(model, latents, context)
    assert model.vae.use_tiling and tiled.shape == whole.shape == (1, 3, 80, 80)
    assert torch.isfinite(tiled).all()
    assert (tiled - whole).abs().mean() < 0.2  # tiles blend into nearly the same image


def test_fp16_runs_keep_the_vae_in_fp32(folder: Path) -> None:
    model = loader.load_sd_model(folder)
    assert pipeline.vae_dtype(model, torch.float16) == torch.float32
    assert pipeline.vae_dtype(model, torch.bfloat16) == torch.bfloat16


def test_prediction_type_overrides(folder: Path, tmp_path: Path) -> None:
    assert loader.load_sd_model(folder).prediction_type == "epsilon"
    assert loader.load_sd_model(folder, prediction="v").prediction_type == "v_prediction"
    single = tiny.save_single_file(tiny.components(seed=3), tmp_path / "m.safetensors")
    single.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert loader.load_sd_model(single).prediction_type == "v_prediction"
    a = api.run("generate", model=str(folder), prompt="x", width=16, height=16, steps=2, seed=1, dtype="fp32")
    b = api.run(
        "generate", model=str(folder), prompt="x", width=16, height=16, steps=2, seed=1, dtype="fp32", prediction="v"
    )
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_out_of_memory_falls_back_to_tiles_and_sliced_attention(folder: Path, monkeypatch, caplog) -> None:
    """An OOM in the U-Net retries with sliced attention (same image), one in the VAE retries in tiles."""
    import logging

    common = dict(model=str(folder), prompt="x", width=16, height=16, steps=2, seed=4, dtype="fp32")
    reference = api.run("generate", **common).images[0]
    model = loader.load_sd_model(folder)
    from difftool.plugins.builtin.sd import models

    unet = next(iter(models._loaded().values())).unet
    real_forward = type(unet).forward
    calls = {"n": 0}

    def forward_oom_unless_sliced(self, *args, **kwargs):
        sliced = any(type(p).__name__.startswith("Sliced") for p in self.attn_processors.values())
        calls["n"] += 1
        if not sliced:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(unet), "forward", forward_oom_unless_sliced)
    real_decode = type(model.vae).decode

    def decode_oom_unless_tiled(self, z, *args, **kwargs):
        if not self.use_tiling:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_decode(self, z, *args, **kwargs)

    monkeypatch.setattr(type(model.vae), "decode", decode_oom_unless_tiled)
    with caplog.at_level(logging.WARNING, logger="difftool"):
        retried = api.run("generate", **common).images[0]
    assert "sliced attention" in caplog.text and "in tiles" in caplog.text
    # Same random state on retry; the tiled decode of a 16 px image is one tile, so the same pixels.
    assert np.array_equal(np.asarray(retried), np.asarray(reference))
    assert not any(type(p).__name__.startswith("Sliced") for p in unet.attn_processors.values())
