"""The example's model family: PixArt-Sigma through difftool's core sampler matches diffusers' own pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import difftool_plugin_example as plugin
import numpy as np
import pytest
import torch
from PIL import Image

from difftool.core.errors import ParameterError
from difftool.plugins.registry import build_registry

SEED, STEPS, SIZE, PROMPT = 3, 4, (32, 24), "a lighthouse at dusk"
#: difftool's scheduler name -> the same scheduler as diffusers' pipeline is given it
SCHEDULERS = {"dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
              "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
              "euler-a": ("EulerAncestralDiscreteScheduler", {})}  # fmt: skip


def tiny_parts() -> dict[str, Any]:
    """A tiny random PixArt-Sigma: T5 encoder (difftool's shipped T5 tokenizer), transformer with learned sigma."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from difftool.plugins.builtin.flow.tokenizers import t5_tokenizer

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, out_channels=8, cross_attention_dim=24, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised layers would give every prompt the same output: fill them
        for p in transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    text_encoder = T5EncoderModel(T5Config(
        d_model=32, d_ff=40, d_kv=8, num_heads=4, num_layers=2, vocab_size=32128, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32, relative_attention_max_distance=128, pad_token_id=0, eos_token_id=1,
    ))  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32, layers_per_block=1,
    )  # fmt: skip
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    parts = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae, "scheduler": scheduler}
    return {**{k: v.eval() if hasattr(v, "eval") else v for k, v in parts.items()}, "tokenizer": t5_tokenizer(300)}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline(**tiny_parts())
    folder = tmp_path_factory.mktemp("pixart") / "pixart-sigma-tiny"
    pipe.save_pretrained(folder)
    return folder, pipe


def ours(folder: Path, **params: Any) -> Image.Image:
    from difftool.app import api

    run = {"prompt": PROMPT, "width": SIZE[0], "height": SIZE[1], "steps": STEPS, "guidance_scale": 4.5, **params}
    registry = build_registry([plugin], entry_points=False)
    return api.run("generate", model=str(folder), seed=SEED, dtype="fp32", registry=registry, **run).images[0]


def reference(pipe: Any, scheduler: str, negative: str) -> Image.Image:
    import diffusers

    cls, overrides = SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **overrides)
    return pipe(
        PROMPT, negative_prompt=negative, width=SIZE[0], height=SIZE[1], num_inference_steps=STEPS, guidance_scale=4.5,
        generator=torch.Generator().manual_seed(SEED), use_resolution_binning=False, clean_caption=False,
    ).images[0]  # fmt: skip


def test_the_family_is_registered_and_detects_its_folders(model: tuple[Path, Any], tmp_path: Path) -> None:
    registry = build_registry([plugin], entry_points=False)
    assert "pixart-sigma" in registry.delegated_families("generate")
    assert registry.family_for(model[0], "generate") is not None
    assert registry.family_for(model[0], "style") is None  # it runs generate only
    assert registry.family_for(tmp_path, "generate") is None


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_generate_matches_pixart_sigma_pipeline(model: tuple[Path, Any], scheduler: str) -> None:
    folder, pipe = model
    image = ours(folder, scheduler=scheduler, negative_prompt="fog")
    assert image.size == SIZE and np.asarray(image).std() > 1
    expected = reference(pipe, scheduler, "fog")
    assert int(np.abs(np.asarray(image, np.int16) - np.asarray(expected, np.int16)).max()) <= 2


def test_options_it_does_not_take_are_refused_in_one_line(model: tuple[Path, Any]) -> None:
    with pytest.raises(ParameterError, match="--clip-skip"):
        ours(model[0], clip_skip=2)
    with pytest.raises(ParameterError, match="multiples of 4"):
        ours(model[0], width=30)
