"""Per-step latency of each CPU backend, side by side in one run, against this machine's matmul peak.

    python benchmarks/backends.py            # about 10 minutes on 2 CPU cores (the SD export dominates)
    python benchmarks/backends.py --no-sd    # the embedded superres model only

For the embedded superres U-Net at 512x512 (batch 1), an SD 1.5-size U-Net with random weights
(64x64 latent, batch 2 = one CFG step, 77 tokens) and the SD 1.5 VAE decoder at 512x512 (what
``--backend-opt export=all`` also runs in ONNX Runtime): one call in torch fp32, torch bf16
(channels_last, as TorchDenoiser runs it) and ONNX Runtime fp32 (the cached, validated export).
FLOPs come from ``torch.utils.flop_counter``; the peak is a 4096^3 matmul in fp32 and bf16 measured
here, so each result is also given as a fraction of the peak of its precision.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sections import update_section  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (kernel selection, caches)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def matmul_peak(dtype: torch.dtype) -> float:
    a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    seconds = best_of(lambda: torch.mm(a, b), 3)
    return 2 * 4096**3 / seconds


def flops_of(module: torch.nn.Module, inputs: dict) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(**inputs)
    return counter.get_total_flops()


def add_fractions(row: dict, flops: int, results: dict) -> None:
    """Each timing as a fraction of its precision's measured peak, and the bf16 floor."""
    for key in ("torch_fp32_s", "torch_bf16_s", "onnxruntime_fp32_s"):
        peak = results["peak_bf16_gflops" if "bf16" in key else "peak_fp32_gflops"] * 1e9
        row[key.replace("_s", "_of_peak")] = round(flops / row[key] / peak, 3)
        row[key] = round(row[key], 3)
    row["floor_bf16_s"] = round(flops / (results["peak_bf16_gflops"] * 1e9), 3)


def measure(name: str, module: torch.nn.Module, inputs: dict, repeats: int, results: dict) -> None:
    from difftool.exporters.onnx import UNetSignature, cached_export
    from difftool.runtimes.onnxruntime.denoiser import make_session

    module = module.float().eval()
    flops = flops_of(module, inputs)
    row: dict = {"gflop": round(flops / 1e9, 1)}
    with torch.no_grad():
        row["torch_fp32_s"] = best_of(lambda: module(**inputs), repeats)
        low = torch.nn.Module.to(module, dtype=torch.bfloat16, memory_format=torch.channels_last)
        cast = {
            k: v.to(torch.bfloat16).contiguous(memory_format=torch.channels_last) if v.ndim == 4 else
            (v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v)
            for k, v in inputs.items()
        }  # fmt: skip
        row["torch_bf16_s"] = best_of(lambda: low(**cast), repeats)
        module = module.float().to(memory_format=torch.contiguous_format)
    started = time.perf_counter()
    entry = cached_export(module, name=f"bench-{name}")
    row["onnx_export_s"] = round(time.perf_counter() - started, 1)
    session = make_session(entry.file("model.onnx"), "cpu")
    signature = UNetSignature.of(module)
    feeds = {n: inputs[n].numpy() if n in inputs else None for n in signature.input_names()}
    feeds["timestep"] = np.full((inputs["sample"].shape[0],), float(inputs["timestep"]), np.float32)
    feeds = {k: v for k, v in feeds.items() if v is not None}
    row["onnxruntime_fp32_s"] = best_of(lambda: session.run(None, feeds), repeats)
    add_fractions(row, flops, results)
    results[name] = row
    print(name, row, flush=True)


def measure_vae_decode(repeats: int, results: dict) -> None:
    """The SD 1.5 VAE decoder at 512x512 (random weights): what a whole-pipeline ONNX run also moves."""
    from diffusers import AutoencoderKL

    from difftool.exporters.onnx_modules import ModuleSpec, cached_module_export
    from difftool.plugins.builtin.sd.families import FAMILIES
    from difftool.plugins.builtin.sd.onnx_parts import VaeDecoderGraph
    from difftool.runtimes.onnxruntime.denoiser import make_session

    torch.manual_seed(0)
    graph = VaeDecoderGraph(AutoencoderKL.from_config(FAMILIES["sd1"].config("vae"))).eval()
    latent = torch.randn(1, 4, 64, 64)
    flops = flops_of(graph, {"latent": latent})
    row: dict = {"gflop": round(flops / 1e9, 1)}
    with torch.no_grad():
        row["torch_fp32_s"] = best_of(lambda: graph(latent), repeats)
        low = torch.nn.Module.to(graph, dtype=torch.bfloat16, memory_format=torch.channels_last)
        cast = latent.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        row["torch_bf16_s"] = best_of(lambda: low(cast), repeats)
        graph = graph.float().to(memory_format=torch.contiguous_format)
    spec = ModuleSpec(
        inputs={"latent": torch.randn(2, 4, 10, 14)},
        dynamic={"latent": {0: ("batch", 1, 64), 2: ("h", 2, 512), 3: ("w", 2, 512)}},
        outputs=("image",),
        checks=({"latent": torch.randn(1, 4, 7, 9)},),
    )
    started = time.perf_counter()
    entry = cached_module_export(lambda: graph, "bench-vae-decoder", spec, model_id="bench-vae")
    row["onnx_export_s"] = round(time.perf_counter() - started, 1)
    session = make_session(entry.file("model.onnx"), "cpu")
    row["onnxruntime_fp32_s"] = best_of(lambda: session.run(None, {"latent": latent.numpy()}), repeats)
    add_fractions(row, flops, results)
    results["sd15_vae_decode_512"] = row
    print("sd15_vae_decode_512", row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-sd", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        import os

        os.environ["DIFFTOOL_CACHE"] = cache
        results: dict = {"threads": torch.get_num_threads()}
        results["peak_fp32_gflops"] = round(matmul_peak(torch.float32) / 1e9, 1)
        results["peak_bf16_gflops"] = round(matmul_peak(torch.bfloat16) / 1e9, 1)
        print(results, flush=True)

        from difftool.plugins.builtin import pixel_model

        model = pixel_model.load_pixel_model(pixel_model.embedded_model_path("superres"), "superres")
        g = torch.Generator().manual_seed(0)
        inputs = {
            "sample": torch.randn(1, model.unet.config.in_channels, 512, 512, generator=g),
            "timestep": torch.tensor(500.0),
            "class_labels": torch.zeros(1, dtype=torch.long),
        }
        measure("superres_512", model.unet, inputs, 3, results)
        if not args.no_sd:
            from diffusers import UNet2DConditionModel

            from difftool.plugins.builtin.sd.families import FAMILIES

            torch.manual_seed(0)
            unet = UNet2DConditionModel.from_config(FAMILIES["sd1"].config("unet"))
            inputs = {
                "sample": torch.randn(2, 4, 64, 64, generator=g),
                "timestep": torch.tensor(500.0),
                "encoder_hidden_states": torch.randn(2, 77, 768, generator=g),
            }
            measure("sd15_unet_64x64_b2", unet, inputs, 1, results)
            del unet
            measure_vae_decode(1, results)
    print(json.dumps(results, indent=2))
    (ROOT / "docs" / "benchmarks-backends.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results)


def write_markdown(r: dict) -> None:
    rows = []
    for name in ("superres_512", "sd15_unet_64x64_b2", "sd15_vae_decode_512"):
        if name not in r:
            continue
        x = r[name]
        rows.append(
            f"| {name} | {x['gflop']} | {x['torch_fp32_s']} ({x['torch_fp32_of_peak']:.0%}) | "
            f"{x['torch_bf16_s']} ({x['torch_bf16_of_peak']:.0%}) | "
            f"{x['onnxruntime_fp32_s']} ({x['onnxruntime_fp32_of_peak']:.0%}) | {x['floor_bf16_s']} |"
        )
    table = f"""## CPU backends, one network call (`python benchmarks/backends.py`)

{r["threads"]} threads; measured matmul peak: {r["peak_fp32_gflops"]} GFLOP/s fp32, {r["peak_bf16_gflops"]} GFLOP/s
bf16. Seconds per call (best of several), with the fraction of the peak of that precision reached
(the 4096^3 matmul is not a hard ceiling: the VAE's large convolutions reach it).

| model | GFLOP | torch fp32 | torch bf16 | ONNX Runtime fp32 | bf16 floor |
|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    update_section(ROOT / "docs" / "benchmarks.md", "backend-benchmark", table)


if __name__ == "__main__":
    main()
