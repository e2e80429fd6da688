"""IP-Adapter on a real CUDA device (marked ``gpu``; skipped without one): ``--reference`` on ``--device cuda``
gives the CPU's image (fp32) and a close one in fp16, so the encoder, the projection, the adapter's processors
and the image tokens all land on the device in the run's precision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from difftool.app import api

from . import tiny, tiny_ipa
from .test_cuda import MIN_PSNR_FP16, MIN_PSNR_FP32, psnr
from .test_parity import photo

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ipa-cuda")
    parts = tiny.components(seed=43)
    tiny_ipa.image_encoder(seed=44).save_pretrained(root / "ipa" / "image_encoder", safe_serialization=True)
    photo((48, 40)).save(root / "painting.png")
    return {
        "model": tiny.save_folder(parts, root / "tiny-sd"),
        "adapter": tiny_ipa.save_adapter(tiny_ipa.adapter(parts["unet"]), root / "ipa" / "ipa.safetensors"),
        "reference": root / "painting.png",
    }


def run(files: dict[str, Path], **kw: Any) -> Any:
    return api.run(
        "generate", model=str(files["model"]), prompt="a lighthouse", width=64, height=48, steps=4, seed=3,
        reference=[files["reference"]], ip_adapter=str(files["adapter"]), reference_mode="style", **kw,
    ).images[0]  # fmt: skip


def test_reference_on_cuda_matches_the_cpu(files: dict[str, Path]) -> None:
    cpu = run(files, device="cpu", dtype="fp32")
    fp32 = psnr(run(files, device="cuda", dtype="fp32"), cpu)
    fp16 = psnr(run(files, device="cuda", dtype="fp16"), cpu)
    print(f"IP-Adapter on CUDA vs CPU: fp32 {fp32:.1f} dB, fp16 {fp16:.1f} dB")
    assert fp32 >= MIN_PSNR_FP32 and fp16 >= MIN_PSNR_FP16
