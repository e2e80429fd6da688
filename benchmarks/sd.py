"""Stable Diffusion speed and memory on this machine: difftool against diffusers, same weights, one run.

    python benchmarks/sd.py                # about 10 minutes on 2 CPU cores; updates docs/benchmarks.md

Builds an SD 1.5-size model with random weights (860 M U-Net parameters, the real VAE and CLIP
ViT-L shapes) from difftool's shipped configs, saves it as a diffusers folder, then measures:

* seconds per denoising step at 512x512 with classifier-free guidance (U-Net batch 2), in fp32 and
  bf16, for diffusers' ``StableDiffusionPipeline`` and for ``difftool.app.api.run("generate")``, both
  timed from their per-step callbacks (the first step is warm-up and not counted);
* peak RSS (VmHWM) of a whole ``difftool run generate`` at 512x512 in bf16, in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

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

    family = FAMILIES["sd1"]
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(family.config("unet")),
        vae=AutoencoderKL.from_config(family.config("vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**family.config("text_encoder"))),
        tokenizer=clip_tokenizer("clip"),
        scheduler=PNDMScheduler.from_config(family.config("scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(path, safe_serialization=True)
    return path


def diffusers_step_seconds(folder: Path, dtype: torch.dtype, steps: int) -> float:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    stamps: list[float] = []

    def on_step(pipe, i, t, kwargs):  # noqa: ANN001 - diffusers' callback signature
        stamps.append(time.perf_counter())
        return kwargs

    pipe("a photo", num_inference_steps=steps, guidance_scale=7.0, callback_on_step_end=on_step)
    del pipe
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def difftool_step_seconds(folder: Path, dtype: str, steps: int) -> float:
    from difftool.app import api

    stamps: list[float] = []
    api.run(
        "generate",
        model=str(folder),
        prompt="a photo",
        steps=steps,
        guidance_scale=7.0,
        dtype=dtype,
        seed=0,
        progress=lambda step, total, preview: stamps.append(time.perf_counter()),
    )
    from difftool.plugins.builtin.sd import models

    models._CACHE.clear()
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    results: dict[str, object] = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "sd15-random")
        unet_params = sum(p.numel() for p in __import__("diffusers").UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", local_files_only=True).parameters())  # fmt: skip
        results["unet_params_m"] = round(unet_params / 1e6, 1)
        for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            results[f"diffusers_{dtype}_s_per_step"] = round(diffusers_step_seconds(folder, torch_dtype, args.steps), 3)
            results[f"difftool_{dtype}_s_per_step"] = round(difftool_step_seconds(folder, dtype, args.steps), 3)
            print(results, flush=True)
        out_png = Path(tmp) / "rss.png"
        seconds, rss = timed_run(
            ["run", "generate", "--model", str(folder), "--prompt", "a photo", "--steps", "2",
             "--dtype", "bf16", "--seed", "0", "-o", str(out_png)]
        )  # fmt: skip
        results["difftool_bf16_512_rss_gib"] = round(rss, 2)
        results["difftool_bf16_512_2step_seconds"] = round(seconds, 1)
    results["bf16_speedup"] = round(results["difftool_fp32_s_per_step"] / results["difftool_bf16_s_per_step"], 2)
    print(json.dumps(results, indent=2))
    (ROOT / "docs" / "benchmarks-sd.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(Path(args.out), results)


def write_markdown(path: Path, r: dict) -> None:
    table = f"""## Stable Diffusion 1.5-size model (random weights), 512x512, CFG (U-Net batch 2)

`python benchmarks/sd.py` on {r["cpu"]} ({r["threads"]} threads); {r["unet_params_m"]} M U-Net parameters;
seconds per step from each pipeline's step callback, DPM++ 2M Karras, first step not counted.

| | fp32 s/step | bf16 s/step |
|---|---|---|
| diffusers `StableDiffusionPipeline` | {r["diffusers_fp32_s_per_step"]} | {r["diffusers_bf16_s_per_step"]} |
| difftool `generate` | {r["difftool_fp32_s_per_step"]} | {r["difftool_bf16_s_per_step"]} |

difftool bf16 is {r["bf16_speedup"]}x its fp32. Peak RSS of a whole `difftool run generate --dtype bf16`
at 512x512 (fresh process, load + 2 steps + VAE decode): {r["difftool_bf16_512_rss_gib"]} GiB
({r["difftool_bf16_512_2step_seconds"]} s).
"""
    update_section(path, "sd-benchmark", table)


if __name__ == "__main__":
    main()
