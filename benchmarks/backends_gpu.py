"""Per-step latency of each GPU backend, side by side in one run (needs an NVIDIA GPU).

    python benchmarks/backends_gpu.py     # torch fp16 eager, ONNX Runtime CUDA fp16, TensorRT fp16

The same denoiser calls as ``benchmarks/backends.py``, through difftool's own backends (what a run
uses): the embedded superres U-Net at 512x512 (batch 1) and an SD 1.5-size U-Net with random weights
(64x64 latent, batch 2 = one CFG step). ONNX Runtime needs ``onnxruntime-gpu`` and TensorRT the
``tensorrt`` package; a backend that cannot run here is reported with its reason, not skipped silently.
TensorRT engines are built for exactly these shapes (static profile), so CUDA graphs are used.
Goal (issue 6): TensorRT fp16 >= 2x torch fp16 eager.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sections import update_section  # noqa: E402


def milliseconds(call: Any, repeats: int = 20) -> float:
    for _ in range(3):  # warm-up: cuDNN/TensorRT tactic choice, CUDA graph capture
        call()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1000


def cases() -> list[tuple[str, torch.nn.Module, torch.Tensor, dict, str]]:
    from diffusers import UNet2DConditionModel

    from difftool.plugins.builtin import pixel_model
    from difftool.plugins.builtin.sd.families import FAMILIES

    g = torch.Generator().manual_seed(0)
    model = pixel_model.load_pixel_model(pixel_model.embedded_model_path("superres"), "superres")
    extra = model.unet.config.in_channels - 3
    superres = (
        "superres_512",
        model.unet,
        torch.randn(1, 3, 512, 512, generator=g),
        {"concat": torch.randn(1, extra, 512, 512, generator=g), "class_labels": torch.zeros(1, dtype=torch.long)},
        model.sha256,
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(FAMILIES["sd1"].config("unet"))
    sd = (
        "sd15_unet_64x64_b2",
        unet,
        torch.randn(2, 4, 64, 64, generator=g),
        {"encoder_hidden_states": torch.randn(2, 77, 768, generator=g)},
        "",
    )
    return [superres, sd]


def measure(name: str, module: torch.nn.Module, sample: torch.Tensor, cond: dict, model_id: str) -> dict:
    from difftool.core.task import ExportShapes
    from difftool.plugins.builtin.backends import OnnxBackend, TensorRTBackend, TorchBackend

    sample = sample.cuda()
    cond = {k: v.cuda() for k, v in cond.items()}
    timestep = torch.tensor(500.0)
    side = sample.shape[-1]
    shapes = ExportShapes(batch=(sample.shape[0],) * 3, size=(side, side, side))
    row: dict[str, Any] = {}
    backends = {
        "torch_fp16": TorchBackend(),
        "onnxruntime_cuda_fp16": OnnxBackend(),
        "tensorrt_fp16": TensorRTBackend(),
    }
    for key, backend in backends.items():
        reason = backend.unavailable_reason("cuda")
        if reason:
            row[key] = f"unavailable: {reason}"
            continue
        try:
            resolved = backend.resolve("cuda", "fp16")
            denoiser = resolved.make_denoiser(module, prediction_type="epsilon", model_id=model_id, shapes=shapes)
            with torch.no_grad():
                row[f"{key}_ms"] = round(milliseconds(lambda d=denoiser: d(sample, timestep, cond)), 2)
        except Exception as error:  # a benchmark reports every backend, including one that fails
            row[key] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        torch.cuda.empty_cache()
    if "tensorrt_fp16_ms" in row and "torch_fp16_ms" in row:
        row["tensorrt_speedup_vs_torch_fp16"] = round(row["torch_fp16_ms"] / row["tensorrt_fp16_ms"], 2)
    print(name, row, flush=True)
    return row


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit(
            "backends_gpu.py needs an NVIDIA GPU and a CUDA build of PyTorch; for the CPU run benchmarks/backends.py"
        )
    with tempfile.TemporaryDirectory() as cache:
        os.environ["DIFFTOOL_CACHE"] = cache
        results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
        for name, module, sample, cond, model_id in cases():
            results[name] = measure(name, module, sample, cond, model_id)
    print(json.dumps(results, indent=2))
    (ROOT / "docs" / "benchmarks-backends-gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results)


def write_markdown(r: dict) -> None:
    def cell(row: dict, key: str) -> str:
        return f"{row[key + '_ms']} ms" if key + "_ms" in row else str(row.get(key, "-"))

    rows = [
        f"| {name} | {cell(r[name], 'torch_fp16')} | {cell(r[name], 'onnxruntime_cuda_fp16')} | "
        f"{cell(r[name], 'tensorrt_fp16')} | {r[name].get('tensorrt_speedup_vs_torch_fp16', '-')} |"
        for name in ("superres_512", "sd15_unet_64x64_b2")
        if name in r
    ]
    table = f"""## GPU backends, one denoiser call (`python benchmarks/backends_gpu.py`)

{r["gpu"]}, torch {r["torch"]}. Milliseconds per call (mean of 20 after warm-up).

| model | torch fp16 eager | ONNX Runtime CUDA fp16 | TensorRT fp16 | TensorRT / torch |
|---|---|---|---|---|
{chr(10).join(rows)}
"""
    update_section(ROOT / "docs" / "benchmarks.md", "gpu-backend-benchmark", table)


if __name__ == "__main__":
    main()
