"""Quality and speed benchmarks of the embedded models; writes docs/benchmarks.md.

    pip install -e ".[bench]" && python benchmarks/run.py            # about 10 minutes on 2 CPU cores
    python benchmarks/run.py --quick                                  # 2 held-out images, no 4096 px run

Quality: each held-out photo (never trained on) is downscaled with Pillow's bicubic filter and
restored; PSNR/SSIM on RGB and on Y with the scale shaved off the borders, against bicubic and Lanczos.
Inpaint: fixed masks (boxes and strokes, 16-96 px), PSNR/SSIM inside the masks against OpenCV's Telea
and Navier-Stokes. Speed: wall time and peak RSS of `difftool run` in a fresh process each.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sections import update_section  # noqa: E402


def mean_rows(rows: list[dict], keys: list[str]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def timed_run(args: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (GiB) of one `difftool ...` command in a fresh process."""
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork+exec from this (large) parent.
    code = (
        "import sys, time; from difftool.cli import main; t = time.perf_counter()\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('SECONDS', time.perf_counter() - t)\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print('RSS', hwm)"
    )
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    values = dict(line.split() for line in out.stdout.splitlines() if line.startswith(("SECONDS", "RSS")))
    return float(values["SECONDS"]), int(values["RSS"]) / 2**20


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()

    import torch

    from difftool.core.devices import resolve_dtype
    from difftool.plugins.builtin.pixel_model import embedded_model_path
    from difftool.training.evaluate import evaluate_inpaint, holdout_images

    limit = 2 if args.quick else None
    ip_model = embedded_model_path("inpaint")
    auto = resolve_dtype("auto", "cpu")
    report: dict = {"dtype_auto": auto}
    lines = [
        "## Embedded models",
        "",
        'Regenerate with `pip install -e ".[bench]" && python benchmarks/run.py` (this section is its output).',
        "",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}. `--dtype auto` resolves to **{auto}** here.",
        "",
    ]
    started = time.perf_counter()

    # Super-resolution (quality, speed, community models) is benchmarked side by side by superres.py.
    lines += ["Super-resolution has its own section below (`python benchmarks/superres.py`).", ""]

    # --- inpaint quality --------------------------------------------------------------------------
    lines += [
        "### Inpainting quality (held-out photos, fixed masks, inside the masks)",
        "",
        "| dtype | image | mask % | PSNR model | Telea | Navier-Stokes | SSIM model | Telea | NS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype in ("fp32", "bf16"):
        rows = evaluate_inpaint(ip_model, dtype=dtype, limit=limit)
        report[f"inpaint_{dtype}"] = rows
        ikeys = ["mask_fraction", "model_psnr", "telea_psnr", "ns_psnr", "model_ssim", "telea_ssim", "ns_ssim"]
        for r in rows + [{"image": "**mean**", **mean_rows(rows, ikeys)}]:
            lines.append(
                f"| {dtype} | {r['image']} | {100 * r['mask_fraction']:.1f} | {r['model_psnr']:.2f} | "
                f"{r['telea_psnr']:.2f} | {r['ns_psnr']:.2f} | {r['model_ssim']:.4f} | {r['telea_ssim']:.4f} | "
                f"{r['ns_ssim']:.4f} |"
            )
    lines += ["", "Target: better than Telea on average.", ""]

    # --- speed --------------------------------------------------------------------------------------
    lines += [
        "### Speed and memory (fresh process each, default settings unless named)",
        "",
        "| job | dtype | seconds | peak RSS GiB |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        photo = holdout_images(1)[0][1]
        photo.resize((512, 512)).save(tmp_path / "512.png")
        jobs: list[tuple[str, list[str], tuple[str, ...]]] = []
        mask = Image.fromarray(
            ((np.indices((512, 512)).sum(axis=0) // 64) % 5 == 0).astype(np.uint8) * 255
        )  # diagonal stripes over ~20% of the image
        mask.save(tmp_path / "mask.png")
        jobs.append(
            (
                "inpaint 512x512 (20% stripes)",
                ["run", "inpaint", str(tmp_path / "512.png"), "--mask", str(tmp_path / "mask.png")],
                ("auto", "fp32"),
            )
        )
        for name, command, dtypes in jobs:
            for dtype in dtypes:
                seconds, rss = timed_run(
                    [*command, "--dtype", dtype, "-o", str(tmp_path / "out.png"), "--overwrite", "--seed", "0"]
                )
                shown = f"{dtype} ({auto})" if dtype == "auto" else dtype
                report[f"speed {name} {dtype}"] = {"seconds": seconds, "rss_gib": rss}
                lines.append(f"| {name} | {shown} | {seconds:.1f} | {rss:.2f} |")
    lines += [
        "",
        "",
        f"Benchmark wall time: {time.perf_counter() - started:.0f} s.",
        "",
    ]
    update_section(Path(args.out), "embedded-benchmark", "\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
