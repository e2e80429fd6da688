"""Super-resolution side by side, in one run: quality, speed and memory; writes its section of docs/benchmarks.md.

    pip install -e ".[bench]" && pip install --no-deps "spandrel>=0.4.2,<0.5" && python benchmarks/superres.py
    python benchmarks/superres.py --quick       # quality in fp32 only, no 1024 px or ONNX rows

Quality: each held-out photo (never trained on) is downscaled with Pillow's bicubic filter and restored
by bicubic, Lanczos and the embedded model (fp32 and bf16); RGB and Y PSNR/SSIM with the scale shaved off
the borders. The previous embedded model's row is kept once, from its recorded evaluation. Speed: wall
time and peak RSS of `difftool run superres` in a fresh process each, for the embedded model and for
two community architectures with random weights (ESRGAN's 23-block RRDB net and Real-ESRGAN's
Compact), on torch and ONNX Runtime. Also writes docs/images/superres-vs-lanczos.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from measure import cpu_name, timed_run  # noqa: E402
from sections import update_section  # noqa: E402

#: The U-Net model this one replaced, as evaluated when it shipped (fp32, seed 0).
PREVIOUS = ROOT / "benchmarks" / "records" / "superres-unet-v1-eval.json"
KEYS = ("psnr", "ssim", "psnr_y", "ssim_y")


def mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def quality_table(rows_by_dtype: dict[str, list[dict]], previous: list[dict]) -> list[str]:
    lines = [
        "| scale | method | PSNR | gain vs bicubic | gain vs Lanczos | PSNR-Y | SSIM | SSIM-Y | worst vs Lanczos |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scale in (2, 4):
        base = [r for r in next(iter(rows_by_dtype.values())) if r["scale"] == scale]
        methods: list[tuple[str, list[dict], str]] = [("bicubic", base, "bicubic"), ("Lanczos", base, "lanczos")]
        methods += [
            (f"**difftool** ({dtype})", [r for r in rows if r["scale"] == scale], "model")
            for dtype, rows in rows_by_dtype.items()
        ]
        methods.append(("previous U-Net (fp32, recorded)", [r for r in previous if r["scale"] == scale], "model"))
        for label, rows, prefix in methods:
            if not rows:
                continue
            gain_b = mean(rows, f"{prefix}_psnr") - mean(rows, "bicubic_psnr")
            gain_l = mean(rows, f"{prefix}_psnr") - mean(rows, "lanczos_psnr")
            worst = min(r[f"{prefix}_psnr"] - r["lanczos_psnr"] for r in rows)
            ssim_y = f"{mean(rows, f'{prefix}_ssim_y'):.4f}" if f"{prefix}_ssim_y" in rows[0] else "-"
            lines.append(
                f"| {scale}x | {label} | {mean(rows, f'{prefix}_psnr'):.2f} | {gain_b:+.2f} dB | {gain_l:+.2f} dB | "
                f"{mean(rows, f'{prefix}_psnr_y'):.2f} | {mean(rows, f'{prefix}_ssim'):.4f} | {ssim_y} | "
                f"{worst:+.2f} dB |"
            )
    return lines


def per_photo(rows: list[dict]) -> list[str]:
    lines = [
        "| scale | photo | bicubic | Lanczos | difftool | vs Lanczos | SSIM difftool | SSIM Lanczos |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scale']}x | {r['image']} | {r['bicubic_psnr']:.2f} | {r['lanczos_psnr']:.2f} | "
            f"{r['model_psnr']:.2f} | {r['model_psnr'] - r['lanczos_psnr']:+.2f} dB | {r['model_ssim']:.4f} | "
            f"{r['lanczos_ssim']:.4f} |"
        )
    return lines


def targets(rows: list[dict]) -> list[str]:
    goals = {2: (2.0, 1.5), 4: (1.2, 1.0)}
    out = []
    for scale, (over_b, over_l) in goals.items():
        chosen = [r for r in rows if r["scale"] == scale]
        gain_b = mean(chosen, "model_psnr") - mean(chosen, "bicubic_psnr")
        gain_l = mean(chosen, "model_psnr") - mean(chosen, "lanczos_psnr")
        ssim_ok = all(r["model_ssim"] > max(r["bicubic_ssim"], r["lanczos_ssim"]) for r in chosen)
        worst_ok = all(r["model_psnr"] > r["lanczos_psnr"] for r in chosen)
        met = gain_b >= over_b and gain_l >= over_l and ssim_ok and worst_ok
        out.append(
            f"* {scale}x: target >= +{over_b} dB over bicubic and >= +{over_l} dB over Lanczos, SSIM above both on "
            f"every photo, no photo below Lanczos. Measured {gain_b:+.2f} / {gain_l:+.2f} dB, SSIM "
            f"{'above both on every photo' if ssim_ok else 'NOT above both everywhere'}, "
            f"{'no photo below Lanczos' if worst_ok else 'a photo below Lanczos'}: **{'met' if met else 'missed'}**."
        )
    return out


def community_models(folder: Path) -> dict[str, Path]:
    """Random-weight community upscalers built with spandrel's classes (speed only)."""
    import torch
    from safetensors.torch import save_file

    from difftool.plugins.builtin.upscalers import import_spandrel

    import_spandrel()
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    nets = {
        "ESRGAN 4x (RRDB, 64 ch, 23 blocks, 16.7 M params)": ESRGAN(num_filters=64, num_blocks=23, scale=4),
        "Real-ESRGAN Compact 4x (64 ch, 32 convs)": Compact(num_feat=64, num_conv=32, upscale=4),
    }
    paths = {}
    for index, (name, net) in enumerate(nets.items()):
        path = folder / f"community-{index}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
        paths[name] = path
    return paths


def comparison_figure(out: Path) -> None:
    """A crop of docs/sample.png, 4x: Lanczos | difftool, side by side and labelled."""
    from difftool.app import api

    sample = Image.open(ROOT / "docs" / "sample.png").convert("RGB")
    box = (40, 20, 112, 74)  # 72 x 54 px of the source
    crop = sample.crop(box)
    lanczos = crop.resize((crop.width * 4, crop.height * 4), Image.Resampling.LANCZOS)
    ours = api.run("superres", sample, scale="4", seed=0).image.crop(tuple(v * 4 for v in box))
    gap, label = 8, 22
    canvas = Image.new("RGB", (lanczos.width * 2 + gap, lanczos.height + label), "white")
    canvas.paste(lanczos, (0, label))
    canvas.paste(ours, (lanczos.width + gap, label))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 5), "Lanczos 4x", fill="black")
    draw.text((lanczos.width + gap + 6, 5), "difftool run superres (4x, embedded model)", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()

    import torch

    from difftool.core.devices import resolve_dtype
    from difftool.plugins.builtin.pixel_model import embedded_model_path
    from difftool.training.evaluate import evaluate_superres, holdout_images

    started = time.perf_counter()
    auto = resolve_dtype("auto", "cpu")
    model = embedded_model_path("superres")
    dtypes = ("fp32",) if args.quick else ("fp32", "bf16")
    rows_by_dtype = {dtype: evaluate_superres(model, dtype=dtype) for dtype in dtypes}
    previous = json.loads(PREVIOUS.read_text()) if PREVIOUS.is_file() else []
    lines = [
        "## Super-resolution, side by side (`python benchmarks/superres.py`)",
        "",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"`--dtype auto` resolves to **{auto}** here. Held-out photos: "
        f"{', '.join(name for name, _ in holdout_images())} (never trained on); RGB PSNR/SSIM with the scale "
        "shaved off the borders, Y (BT.601) PSNR too; 1 sampling step (the default), seed 0.",
        "",
        "### Quality, mean over the held-out photos",
        "",
        *quality_table(rows_by_dtype, previous),
        "",
        "### Targets (issue: superres worth running)",
        "",
        *targets(rows_by_dtype["fp32"]),
        "",
        "### Per photo (fp32)",
        "",
        *per_photo(rows_by_dtype["fp32"]),
        "",
        "![4x crop of docs/sample.png: Lanczos and difftool side by side](images/superres-vs-lanczos.png)",
        "",
        "(`docs/sample.png` is a downscaled training photo, the Middlebury motorcycle: the figure is a demo, "
        "the tables above are the evaluation.)",
        "",
        "### Speed and memory (fresh process each; seconds include loading; s/MP per output megapixel)",
        "",
        "| model | job | backend | dtype | seconds | s/MP | peak RSS GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    report: dict = {"quality": rows_by_dtype}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        photo = holdout_images(1)[0][1]
        for size in (128, 256, 512, 1024):
            photo.resize((size, size)).save(tmp_path / f"{size}.png")
        community = community_models(tmp_path)
        jobs = [
            ("embedded", "512 -> 2048 (4x)", ["512.png", "--scale", "4"], "torch", ("auto", "fp32")),
            ("embedded", "512 -> 1024 (2x)", ["512.png", "--scale", "2"], "torch", ("auto",)),
            ("embedded", "512 -> 2048 (4x)", ["512.png", "--scale", "4"], "onnx", ("fp32",)),
        ]
        if not args.quick:
            jobs.append(("embedded", "1024 -> 4096 (4x)", ["1024.png", "--scale", "4"], "torch", ("auto",)))
        for name, path in community.items():
            size = 128 if "RRDB" in name else 256
            job = f"{size} -> {size * 4} (4x)"
            jobs.append((name, job, [f"{size}.png", "--model", str(path)], "torch", ("auto", "fp32")))
            if not args.quick:
                jobs.append((name, job, [f"{size}.png", "--model", str(path)], "onnx", ("fp32",)))
        os.environ["DIFFTOOL_CACHE"] = str(tmp_path / "cache")  # the ONNX exports happen in a warm-up run
        for name, job, command, backend, job_dtypes in jobs:
            argv = ["run", "superres", str(tmp_path / command[0]), *command[1:], "--backend", backend]
            output_mp = int(job.split("-> ")[1].split()[0]) ** 2 / 1e6
            if backend == "onnx":
                timed_run([*argv, "-o", str(tmp_path / "warm.png"), "--overwrite", "--seed", "0"])
            for dtype in job_dtypes:
                seconds, rss = timed_run(
                    [*argv, "--dtype", dtype, "-o", str(tmp_path / "out.png"), "--overwrite", "--seed", "0"]
                )
                shown = f"auto ({auto})" if dtype == "auto" else dtype
                report[f"{name} {job} {backend} {dtype}"] = {"seconds": seconds, "rss_gib": rss}
                lines.append(
                    f"| {name} | {job} | {backend} | {shown} | {seconds:.1f} | {seconds / output_mp:.1f} | {rss:.2f} |"
                )
    figure = ROOT / "docs" / "images" / "superres-vs-lanczos.png"
    comparison_figure(figure)
    lines += [
        "",
        "Target: 512 -> 2048 (4x) with the embedded model within 30 s on this CPU. Community models run with "
        "random weights (speed does not depend on the weights); the ONNX rows exclude the one-time export "
        "(a warm-up run makes it).",
        "",
        f"Benchmark wall time: {time.perf_counter() - started:.0f} s.",
    ]
    update_section(Path(args.out), "superres-benchmark", "\n".join(lines))
    Path(args.out).with_name("benchmarks-superres.json").write_text(json.dumps(report, indent=1, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
