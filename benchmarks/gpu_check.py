"""The 10-minute GPU check: everything a borrowed GPU machine should tell us, in one run and one report.

    python benchmarks/gpu_check.py --out gpu-check.md               # on the GPU machine, under 9 minutes
    python benchmarks/gpu_check.py --dry-run --out /tmp/check.md    # on a CPU, in seconds (CI runs it)

Written for a bare H100/H200 with torch + CUDA, onnxruntime without a CUDA provider and (usually) no
TensorRT. It runs, each within a share of ``--budget`` seconds and reported even when it fails:

1. ``pytest -m gpu`` (the CUDA tests; TensorRT's are skipped with their reason when it is missing);
2. torch CUDA fp16 and bf16 against the CPU in fp32, per task (PSNR of the images): superres and
   inpaint (embedded models), generate and style (a tiny random Stable Diffusion);
3. one U-Net step, SD 1.5-size (64x64 latents, batch 2) and SDXL-size (128x128, batch 2), random weights
   from the shipped configs, fp16: diffusers' ``UNet2DConditionModel`` call (the step a diffusers
   pipeline makes), difftool's torch backend, ``torch.compile`` and a replayed CUDA graph, side by side;
4. only if ``import tensorrt`` works: a refittable vs a REFIT_IDENTICAL engine's output against torch
   (issue 30 item 3) and, with two GPUs, both GPUs' engines surviving each other's builds (item 2).

``--dry-run`` runs the same code on the CPU with tiny shapes (pytest only collects), to keep the script
working between GPU runs; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
#: The test files holding the ``gpu`` marked tests (collected by file: collecting the whole suite is slow).
GPU_TESTS = ["tests/runtimes/tensorrt/test_tensorrt.py", "tests/plugins/builtin/sd/test_cuda.py",
             "tests/plugins/builtin/test_cuda_pixel.py", "tests/training/test_gpu_train.py"]  # fmt: skip


class Report:
    """Markdown sections, each run against a deadline: a section past it is reported as not run."""

    def __init__(self, budget: float, dry: bool) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.dry = dry
        self.parts: list[str] = []

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, title: str, run: Callable[[], str], needs: float = 0.0) -> None:
        started = time.monotonic()
        if self.remaining() < needs:
            body = f"not run: {self.remaining():.0f} s of the budget left, this section needs about {needs:.0f} s"
        else:
            try:
                body = run()
            except Exception:  # noqa: BLE001 - a check reports its failure and the next one runs
                body = "failed:\n\n```\n" + traceback.format_exc()[-3000:] + "```"
        took = time.monotonic() - started
        self.parts.append(f"## {title}\n\n{body.strip()}\n\n({took:.1f} s)\n")
        print(f"[gpu_check] {title}: {took:.1f} s", flush=True)

    def markdown(self, header: str) -> str:
        total = time.monotonic() - self.started
        return f"{header}\n\nTotal {total:.0f} s.\n\n" + "\n".join(self.parts)


def environment(device: str) -> str:
    import torch

    rows = [("python", platform.python_version()), ("torch", torch.__version__),
            ("CUDA (torch)", str(torch.version.cuda))]  # fmt: skip
    if device == "cuda":
        rows += [(f"cuda:{i}", torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]
    for package in ("diffusers", "onnxruntime", "tensorrt"):
        try:
            module = __import__(package)
            rows.append((package, getattr(module, "__version__", "?")))
        except Exception as error:  # noqa: BLE001 - missing or broken: say which
            rows.append((package, f"not importable ({type(error).__name__})"))
    with contextlib.suppress(Exception):
        import onnxruntime

        rows.append(("onnxruntime providers", ", ".join(onnxruntime.get_available_providers())))
    return "| what | version |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def gpu_tests(dry: bool, timeout: float) -> str:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:randomly", "-p", "no:cacheprovider"]
    command += ["--collect-only"] if dry else ["-s"]
    command += GPU_TESTS
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)  # noqa: S603
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
    return f"`{' '.join(command[1:])}`: exit {done.returncode}\n\n```\n{tail}\n```"


def _picture(side: int) -> Any:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side]
    base = np.stack([x * 255 / side, y * 255 / side, 128 + 60 * np.sin(x / 4) * np.cos(y / 6)], axis=-1)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def parity(device: str, dry: bool) -> str:
    """Each task in fp16 and bf16 on ``device`` against fp32 on the CPU (PSNR of the output images)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from difftool.app import api
    from difftool.training.evaluate import psnr

    side = 32 if dry else 96
    picture = _picture(side)
    mask = Image.new("L", picture.size, 0)
    ImageDraw.Draw(mask).ellipse((side // 5, side // 4, side * 3 // 4, side * 4 // 5), fill=255)
    cases: list[tuple[str, Any, dict[str, Any]]] = [
        ("superres", picture, {}),
        ("inpaint", picture, {"mask": mask}),
    ]
    if not dry:  # a tiny random Stable Diffusion (the test suite's), saved as a diffusers folder
        sys.path.insert(0, str(ROOT / "tests" / "plugins" / "builtin"))
        from sd import tiny

        folder = tiny.save_folder(tiny.components(seed=5), Path(tempfile.mkdtemp()) / "tiny-sd")
        sd = {"model": str(folder), "prompt": "a lighthouse", "steps": 6, "scheduler": "euler"}
        cases += [("generate", None, {**sd, "width": 64, "height": 64}), ("style", picture, {**sd, "strength": 0.6})]
    dtypes = ["bf16"] if dry else ["fp16", "bf16"]
    rows = []
    for task, image, params in cases:
        inputs = () if image is None else (image,)
        reference = np.asarray(api.run(task, *inputs, device="cpu", dtype="fp32", seed=3, **params).images[0])
        cells = []
        for dtype in dtypes:
            try:
                result = api.run(task, *inputs, device=device, dtype=dtype, seed=3, **params)
                cells.append(f"{psnr(reference, np.asarray(result.images[0])):.1f} dB ({result.record.get('dtype')})")
            except Exception as error:  # noqa: BLE001 - one dtype failing is a finding, not the end
                cells.append(f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
        rows.append(f"| {task} | " + " | ".join(cells) + " |")
    head = "| task | " + " | ".join(f"{device} {d} vs cpu fp32" for d in dtypes) + " |"
    return head + "\n|---|" + "---|" * len(dtypes) + "\n" + "\n".join(rows)


def _unet(family: str, dry: bool) -> tuple[Any, dict[str, Any], int]:
    """A random-weight U-Net of ``family``'s shipped config (a tiny one for the dry run), its extra
    inputs and latent side."""
    from diffusers import UNet2DConditionModel

    from difftool.plugins.builtin.sd.families import FAMILIES

    config = dict(FAMILIES[family].config("unet"))
    side = 64 if family == "sd1" else 128
    if dry:  # the same kind of U-Net, small enough for a CPU in a second
        config |= {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 32,
                   "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                   "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": 1,
                   "attention_head_dim": 8}  # fmt: skip
        side = 16
    unet = UNet2DConditionModel.from_config(config).eval().requires_grad_(False)
    added = {}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": (2, pooled), "time_ids": (2, 6)}
    return unet, added, side


def unet_speed(family: str, device: str, dry: bool, compile_budget: float) -> str:
    """Milliseconds per U-Net step (batch 2, fp16 on CUDA, fp32 on the CPU) four ways."""
    import torch

    from difftool.core.denoiser import TorchDenoiser

    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    unet, added, side = _unet(family, dry)
    unet = unet.to(device, dtype)
    g = torch.Generator().manual_seed(0)
    context = int(unet.config.cross_attention_dim)
    sample = torch.randn(2, 4, side, side, generator=g).to(device, dtype)
    text = torch.randn(2, 77, context, generator=g).to(device, dtype)
    extra = {k: torch.randn(*s, generator=g).to(device, dtype) for k, s in added.items()}
    t = torch.tensor([500.0, 500.0], device=device)
    kwargs = {"encoder_hidden_states": text, **({"added_cond_kwargs": extra} if extra else {})}
    repeats = 2 if dry else 20

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def ms(call: Callable[[], Any]) -> float:
        for _ in range(1 if dry else 3):
            call()
        sync()
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        sync()
        return (time.perf_counter() - started) / repeats * 1000

    rows: list[tuple[str, str]] = []
    with torch.inference_mode():
        eager = ms(lambda: unet(sample, t, **kwargs).sample)
        rows.append(("diffusers UNet2DConditionModel, eager (a diffusers pipeline's step call)", f"{eager:.2f}"))
        denoiser = TorchDenoiser(unet, prediction_type="epsilon", device=device, dtype=dtype)
        cond = {"encoder_hidden_states": text, **({"added_cond_kwargs": extra} if extra else {})}
        rows.append(("difftool torch backend (TorchDenoiser, channels-last)",
                     f"{ms(lambda: denoiser(sample, t, cond)):.2f}"))  # fmt: skip
        if device == "cuda":
            static = sample.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    unet(static, t, **kwargs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                unet(static, t, **kwargs)
            rows.append(("CUDA graph of the eager step, replayed", f"{ms(graph.replay):.2f}"))
        else:
            rows.append(("CUDA graph of the eager step, replayed", "n/a on the CPU"))
    if dry:  # compiling on a CPU needs a C compiler and minutes: nothing the dry run is for
        rows.append(("torch.compile (default mode)", "not run in the dry run"))
    elif compile_budget <= 0:
        rows.append(("torch.compile (default mode)", "not run: no time left in the budget"))
    else:
        compiled = torch.compile(unet)
        with torch.inference_mode():
            started = time.perf_counter()
            compiled(sample, t, **kwargs)
            sync()
            first = time.perf_counter() - started
            rows.append((f"torch.compile (default mode; first call {first:.0f} s)",
                         f"{ms(lambda: compiled(sample, t, **kwargs).sample):.2f}"))  # fmt: skip
    precision = "fp16" if device == "cuda" else "fp32"
    shape = f"batch 2, {side}x{side} latents, {precision}"
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"{shape}; milliseconds per step (mean of {repeats})\n\n| path | ms |\n|---|---|\n{table}"


def tensorrt_checks(device: str) -> str:
    """Refittable vs REFIT_IDENTICAL engines against torch; both GPUs' engines surviving (with two GPUs)."""
    import torch

    from difftool.exporters.cache import ArtifactCache
    from difftool.plugins.builtin.backends import TensorRTBackend

    sys.path.insert(0, str(ROOT / "tests" / "plugins" / "builtin"))
    from sd import tiny

    lines = []
    unet = tiny.components(seed=7)["unet"]
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        expected = unet.float()(sample, torch.tensor([500.0, 500.0]), encoder_hidden_states=text).sample
    with tempfile.TemporaryDirectory() as cache:
        os.environ["DIFFTOOL_CACHE"] = cache
        for refit in ("on", "off"):
            backend = TensorRTBackend().resolve(device, "fp32", {"refit": refit, "cuda_graphs": "off"})
            denoiser = backend.make_denoiser(unet, prediction_type="epsilon", model_id="7" * 64)
            out = denoiser(sample.to(device), torch.tensor(500.0), {"encoder_hidden_states": text.to(device)})
            error = float((out.float().cpu() - expected).abs().max() / expected.abs().max())
            lines.append(f"| refit={refit} (fp32) | {error:.2e} |")
        if torch.cuda.device_count() >= 2:
            for index in (0, 1):
                backend = TensorRTBackend().resolve(f"cuda:{index}", "fp16", {"refit": "off"})
                backend.make_denoiser(unet, prediction_type="epsilon", model_id="8" * 64)
            engines = [folder for folder, ok in ArtifactCache().entries() if ok and folder.parent.name == "tensorrt"]
            lines.append(f"| engines of cuda:0 and cuda:1 both cached | {len(engines)} verified entries |")
        else:
            lines.append("| two-GPU engine keys | not run: one GPU |")
    return "| check | max relative error vs torch fp32 |\n|---|---|\n" + "\n".join(lines)


def tensorrt_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any failure to import means no TensorRT checks
        return f"not run: `import tensorrt` failed ({type(error).__name__}: {str(error).splitlines()[0][:100]})"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with tiny shapes, in seconds")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.md"), help="the markdown report")
    parser.add_argument("--budget", type=float, default=510.0, help="seconds for the whole check (default 510)")
    parser.add_argument("--skip-compile", action="store_true", help="leave torch.compile out")
    args = parser.parse_args(argv)
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check.py needs a CUDA GPU and a CUDA build of PyTorch; --dry-run runs it on the CPU", file=sys.stderr
        )
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = Report(args.budget, args.dry_run)
    report.section("Environment", lambda: environment(device))
    report.section("pytest -m gpu", lambda: gpu_tests(args.dry_run, max(30.0, min(200.0, report.remaining() - 240))),
                   needs=60)  # fmt: skip
    report.section("Torch on the GPU against the CPU, per task", lambda: parity(device, args.dry_run), needs=20)
    for family, title, compile_needs in (("sd1", "SD 1.5-size U-Net step", 90), ("sdxl", "SDXL-size U-Net step", 150)):
        budget = 0.0 if args.skip_compile else report.remaining() - compile_needs - 30
        report.section(title, lambda f=family, b=budget: unet_speed(f, device, args.dry_run, b), needs=15)
    reason = tensorrt_reason() or ("not run in the dry run: TensorRT needs a GPU" if args.dry_run else None)
    report.section("TensorRT", (lambda: reason) if reason else (lambda: tensorrt_checks(device)), needs=30)
    kind = "DRY RUN on the CPU (tiny shapes: the figures mean nothing)" if args.dry_run else "GPU run"
    header = f"# difftool GPU check: {kind}\n\n`python benchmarks/gpu_check.py{' --dry-run' if args.dry_run else ''}`, "
    header += time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.markdown(header))
    print(f"[gpu_check] report: {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
