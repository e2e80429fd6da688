"""Stable Diffusion on a real CUDA device (marked ``gpu``; skipped without one): ControlNet units, the SDXL
refiner and the hires pass give the CPU's images on ``--device cuda``, so no tensor is left on the wrong
device and no dtype is lost on the way. Run on a GPU machine with ``pytest -m gpu -s`` (it prints its figures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.app import api

from . import tiny
from .test_parity import photo

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())"),
]

#: CPU and GPU kernels (cuDNN, TF32 convolutions) round differently; the same run must stay this close,
#: far closer than a run without the unit or the refiner (tens of /255 away).
MIN_PSNR_FP32, MIN_PSNR_FP16 = 40.0, 35.0  # measured on an H200 (torch 2.11, CUDA 13): 62-65 and 59 dB


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cuda")
    parts = tiny.components(vae_levels=4, seed=41)
    photo((80, 64)).save(root / "control.png")
    xl = tiny.components(xl=True, seed=43)
    return {
        "sd": tiny.save_folder(parts, root / "tiny-sd"),
        "cn": tiny.save_controlnet_file(tiny.controlnet(parts["unet"], seed=42), root / "cn.safetensors"),
        "image": root / "control.png",
        "xl": tiny.save_folder(xl, root / "tiny-sdxl"),
        "refiner": tiny.save_folder(tiny.refiner_components(seed=44), root / "tiny-refiner"),
    }


def run(model: Path, **params: Any) -> Image.Image:
    common = dict(prompt="a lighthouse", negative_prompt="fog", steps=6, seed=5, scheduler="euler", dtype="fp32")
    return api.run("generate", model=str(model), **{**common, **params}).images[0]


def test_controlnet_on_cuda_gives_the_cpu_image(models: dict[str, Path]) -> None:
    units = [f"{models['cn']}={models['image']},weight=0.8,end=0.7", f"{models['cn']}={models['image']},guess=1"]
    size = dict(width=80, height=64)
    cpu = run(models["sd"], control=units, device="cpu", **size)
    gpu = run(models["sd"], control=units, device="cuda", **size)
    half = run(models["sd"], control=units, device="cuda", **{**size, "dtype": "fp16"})
    plain = run(models["sd"], device="cuda", **size)
    figures = (psnr(cpu, gpu), psnr(cpu, half), psnr(cpu, plain))
    print(
        f"ControlNet cuda vs cpu: fp32 {figures[0]:.1f} dB, fp16 {figures[1]:.1f} dB; uncontrolled {figures[2]:.1f} dB"
    )
    assert figures[0] > MIN_PSNR_FP32 and figures[1] > MIN_PSNR_FP16 and figures[2] < figures[1] - 5


def test_refiner_on_cuda_gives_the_cpu_image(models: dict[str, Path]) -> None:
    size = dict(width=48, height=32)
    cpu = run(models["xl"], refiner=str(models["refiner"]), device="cpu", **size)
    gpu = run(models["xl"], refiner=str(models["refiner"]), device="cuda", **size)
    base = run(models["xl"], device="cuda", **size)
    figures = (psnr(cpu, gpu), psnr(cpu, base))
    print(f"refiner cuda vs cpu: {figures[0]:.1f} dB; base alone {figures[1]:.1f} dB")
    assert figures[0] > MIN_PSNR_FP32 and figures[1] < figures[0] - 5


def test_hires_on_cuda_gives_the_cpu_image(models: dict[str, Path]) -> None:
    params = dict(width=48, height=32, hires=2.0, hires_steps=3)
    cpu, gpu = run(models["sd"], device="cpu", **params), run(models["sd"], device="cuda", **params)
    print(f"hires cuda vs cpu: {psnr(cpu, gpu):.1f} dB")
    assert gpu.size == (96, 64) and psnr(cpu, gpu) > MIN_PSNR_FP32
