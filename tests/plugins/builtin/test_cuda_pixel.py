"""The embedded superres and inpaint models on a real CUDA device (marked ``gpu``; skipped without one):
the CPU's images in fp32, and close to them in fp16. ``pytest -m gpu -s`` prints the figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from difftool.app import api
from difftool.training.evaluate import psnr

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())"),
]


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:96, 0:96]
    base = np.stack([x * 2.5, y * 2.5, 128 + 60 * np.sin(x / 4) * np.cos(y / 6)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("task", ["superres", "inpaint"])
def test_embedded_model_on_cuda_gives_the_cpu_image(picture: Image.Image, task: str) -> None:
    params: dict = {"seed": 0}
    if task == "inpaint":
        mask = Image.new("L", picture.size, 0)
        ImageDraw.Draw(mask).ellipse((20, 25, 70, 75), fill=255)
        params["mask"] = mask
    cpu = np.asarray(api.run(task, picture, device="cpu", dtype="fp32", **params).image)
    gpu = np.asarray(api.run(task, picture, device="cuda", dtype="fp32", **params).image)
    half = api.run(task, picture, device="cuda", dtype="fp16", **params)
    figures = psnr(cpu, gpu), psnr(cpu, np.asarray(half.image))
    print(f"{task} cuda vs cpu: fp32 {figures[0]:.1f} dB, fp16 {figures[1]:.1f} dB ({half.record.get('dtype')})")
    assert figures[0] > 40.0 and figures[1] > 35.0
