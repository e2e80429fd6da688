"""Seconds and peak RSS of the high-resolution Stable Diffusion paths on a small random model.

    python benchmarks/sd_upscale.py        # a few minutes on 2 CPU cores; updates docs/benchmarks.md

Each row is one whole ``difftool run ...`` in a fresh process (load, sampling, VAE, writing the PNG):

* ``upscale-sd`` 2048 -> 4096 (Lanczos first, then 512 px tiles repainted with img2img), against one
  512 px ``style`` run: the tiled job's memory is the tile's plus the 4096 px image buffers, not a
  4096 px U-Net and VAE;
* ``generate --hires 2`` (512 -> 1024, latent upscaler) against plain ``generate`` at 512.

The model is small (a 2-level U-Net, an 8x VAE, a 2-layer CLIP) so the figures show the pipeline's
overhead and memory bound, not a real checkpoint's compute.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from measure import cpu_name, timed_run  # noqa: E402
from sections import update_section  # noqa: E402


def build_model(path: Path) -> Path:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from difftool.plugins.builtin.sd.families import FAMILIES
    from difftool.plugins.builtin.sd.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        sample_size=64,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
    )
    text = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(text),
        tokenizer=clip_tokenizer("clip"),
        scheduler=PNDMScheduler.from_config(FAMILIES["sd1"].config("scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def main() -> None:
    out = ROOT / "docs" / "benchmarks.md"
    results: dict[str, object] = {"cpu": cpu_name(), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(build_model(Path(tmp) / "small-sd"))
        rng = np.random.default_rng(0)
        for side in (512, 2048):
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(Path(tmp) / f"in{side}.png")
        common = ["--model", folder, "--seed", "0", "--dtype", "bf16", "--steps", "4"]
        runs = {
            "style_512": ["run", "style", f"{tmp}/in512.png", "--prompt", "a field", "--strength", "0.5", *common],
            "upscale_sd_2048_to_4096": [
                "run",
                "upscale-sd",
                f"{tmp}/in2048.png",
                "--prompt",
                "a field",
                "--scale",
                "2",
                "--upscaler",
                "lanczos",
                "--strength",
                "0.5",
                "--tile",
                "512",
                *common,
            ],  # fmt: skip
            "generate_512": ["run", "generate", "--prompt", "a field", "--width", "512", "--height", "512", *common],
            "generate_512_hires_2x": [
                "run",
                "generate",
                "--prompt",
                "a field",
                "--width",
                "512",
                "--height",
                "512",
                "--hires",
                "2",
                "--hires-steps",
                "4",
                *common,
            ],  # fmt: skip
        }
        for name, args in runs.items():
            seconds, rss = timed_run([*args, "-o", f"{tmp}/{name}.png", "--overwrite"])
            results[name] = {"seconds": round(seconds, 1), "rss_gib": round(rss, 2)}
            print(name, results[name], flush=True)
    (ROOT / "docs" / "benchmarks-sd-upscale.json").write_text(json.dumps(results, indent=2) + "\n")
    measured = {name: r for name, r in results.items() if isinstance(r, dict)}
    rows = "\n".join(f"| `{name}` | {r['seconds']} | {r['rss_gib']} |" for name, r in measured.items())
    update_section(
        out,
        "sd-upscale-benchmark",
        f"""## High resolution with Stable Diffusion: `upscale-sd` and `generate --hires`

`python benchmarks/sd_upscale.py` on {results["cpu"]} ({results["threads"]} threads), a small random model
(2-level U-Net, 8x VAE), bf16, 4 steps; each row a whole `difftool run` in a fresh process (peak RSS = VmHWM).

| run | seconds | peak RSS (GiB) |
|---|---|---|
{rows}

`upscale-sd` 2048 -> 4096 repaints 81 tiles of 512 px; its memory is one tile's work plus the 4096 px image
buffers (float32 RGB, accumulator and weights), not a 4096 px U-Net or VAE pass.
""",
    )


if __name__ == "__main__":
    main()
