"""Train the real-world superres models (issue 33) on a borrowed GPU in about 10 minutes; the weights come back.

    python benchmarks/gpu_train_superres.py --out "$OUT"                  # on the GPU machine (--budget 540 s)
    python benchmarks/gpu_train_superres.py --dry-run --out /tmp/gpu-sr   # on a CPU, tiny sizes, seconds
    python benchmarks/gpu_train_superres.py --unpack FILES_AT -o runs     # here, afterwards

It trains ``difftool/training/configs/superres-real-gpu-x2.json`` then ``-x4.json`` (SRNet 64 channels x 12
blocks like the shipped model, so CPU inference speed is unchanged; fine-tuned from the shipped
``difftool/models/superres-real/x{2,4}``, which travels with the tree; the Debian photos plus the wheel
corpus; batches of 64 crops of 128 / 192 px from 14 worker processes, bf16 on the GPU), each within its
share of ``--budget`` seconds. After ``PROBE`` steps it measures steps/s and sets the run's ``steps`` so the
cosine schedule ends inside the share (the config's figure is the estimate below; the checkpoint records
the count used); past the share it stops anyway, with a checkpoint and an export.

Step-count estimate (the configs' ``steps``): an SRNet step costs about 3 x the forward's FLOPs; the forward
is 2 x 942k MACs per low-resolution pixel at 2x (24 body convs of 64x64x3x3, head and tail) and 2 x 1.005M
at 4x, so a batch is 1.48 TFLOP (x2: 64 x 64x64 px) and 0.89 TFLOP (x4: 64 x 48x48 px). At an assumed
150 TFLOP/s for 64-channel convolutions in bf16 on an H100 (a fifth of its dense peak; elementwise FiLM and
ReLU passes are memory-bound) that is about 10 and 6 ms: the GPU outruns the data. Making a crop with
the real-world degradation took 3.9 ms (128 px) and 5.5 ms (192 px) on one busy core here, so 14 workers
give about 55 and 40 batches/s; over ~255 s of training per scale that is ~14,000 (x2) and ~10,000 (x4).

The device call (the device tool's ``run``), from the repository root, after preparing here once (both
folders are git-ignored; the machine has torch, numpy, pillow, scipy, scikit-image, scikit-learn,
matplotlib, safetensors, huggingface-hub, tqdm and click, but not diffusers)::

    python -m difftool.training.debian_photos runs/debian-photos
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl diffusers==0.42.1

    run(carry=[".whl", "runs/debian-photos"], timeout_s=600, command=
        "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
        ".whl/*.whl && export PYTHONPATH=/tmp/site || exit; "
        "PYTHONUNBUFFERED=1 python3 benchmarks/gpu_train_superres.py --out $OUT --budget 540")

What travels: the tracked tree (~20 MB), the diffusers wheel (6.4 MB) and the photos (30 MB), under the
64 MiB limit. What comes back (at most 8 files of 16 MiB): per scale ``superres-real-gpu-xN.tar`` (the
exported ``model/`` and the checkpoint's weights, EMA and state) and ``superres-real-gpu-xN.optimizer.safetensors``
(the Adam moments, so the run can resume here), and ``gpu_train_superres.log`` (steps/s, loss, the GPU).
The script ends by printing the follow-up to run here.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCALES = (2, 4)
#: Steps run before the run's step count is fitted to its share of the budget, and the first of them not
#: timed: while the GPU warms up the workers queue batches ahead, which the next steps eat faster than
#: the workers make them (about 1 s of backlog at 14 workers x 4).
PROBE, UNTIMED = 400, 150
#: Seconds kept per scale for the last checkpoint, export and packing.
RESERVE = 15.0
LOG_EVERY_S = 10.0
SHIPPED = ("model/", "checkpoint/state.json", "checkpoint/model.safetensors", "checkpoint/ema.safetensors")


class Log:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        with self.path.open("a") as stream:
            stream.write(line + "\n")


def run_name(scale: int) -> str:
    return f"superres-real-gpu-x{scale}"


def load_config(scale: int, dry: bool, photos: Path):
    from difftool.training.train import TrainConfig

    config = TrainConfig.from_file(ROOT / "difftool" / "training" / "configs" / f"{run_name(scale)}.json")
    config.init = str(ROOT / config.init) if config.init else None
    config.folders = [str(photos)]
    if dry:  # the same code on the CPU: tiny crops and batches, a few steps, two workers
        config.device, config.workers, config.threads = "cpu", 2, 1
        config.batch, config.crop, config.steps, config.save_every = 2, 32, 6, 3
        config.builtin_data = False
    return config


def shared_memory_workers(config, log: Log) -> None:
    """Fewer workers where /dev/shm cannot hold the batches in flight (a container's 64 MB default)."""
    from difftool.training.loader import PREFETCH

    if not config.workers or not Path("/dev/shm").is_dir():
        return
    per_batch = 3 * config.batch * 3 * config.crop**2 * 4  # target, cond, noise: float32
    free = shutil.disk_usage("/dev/shm").free
    fits = int(free * 0.5 // (per_batch * (PREFETCH + 1)))  # 0: batches made in the loop
    if fits < config.workers:
        log(f"/dev/shm has {free / 2**30:.1f} GiB free: {fits} workers instead of {config.workers}")
        config.workers = fits


def train_scale(scale: int, pool, work: Path, out: Path, deadline: float, args, log: Log) -> None:
    import numpy as np

    from difftool.training.train import Trainer

    config = load_config(scale, args.dry_run, args.photos)
    shared_memory_workers(config, log)
    run = work / run_name(scale)
    if run.exists():  # never delete a run this script did not make: it may be one to resume
        raise SystemExit(f"{run} exists; move it away or give another --work")
    started = time.monotonic()
    trainer = Trainer(config, run)
    if trainer.device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    planned = config.steps
    marks: list[float] = []
    last = [started]

    def on_step(t: Trainer) -> None:
        now = time.monotonic()
        marks.append(now)
        if now - last[0] >= LOG_EVERY_S or t.step == t.config.steps:
            recent = marks[-200:]
            rate = (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9)
            log(
                f"x{scale} step {t.step}/{t.config.steps}  loss {np.mean(t.losses[-100:]):.4f}  "
                f"{rate:.1f} steps/s  lr {t.lr_at(t.step):.1e}  {now - started:.0f} s"
            )
            last[0] = now

    probe = min(PROBE, max(2, config.steps // 3))
    trainer.fit(pool, progress=False, stop_after=probe, deadline=deadline - RESERVE, on_step=on_step)
    skip = min(UNTIMED, len(marks) // 2)
    rate = (len(marks) - 1 - skip) / max(marks[-1] - marks[skip], 1e-9)
    if not args.dry_run:  # fit the cosine schedule to the time left (the checkpoint records the count)
        left = max(0.0, deadline - RESERVE - time.monotonic())
        config.steps = max(trainer.step + 1, trainer.step + int(rate * left * 0.95))
    log(f"x{scale}: {rate:.1f} steps/s after {trainer.step} steps; steps {planned} planned, {config.steps} fitted")
    trainer.fit(pool, progress=False, deadline=deadline - RESERVE, on_step=on_step)
    elapsed = time.monotonic() - started
    log(
        f"x{scale} done: {trainer.step} steps in {elapsed:.0f} s ({trainer.step / elapsed:.1f} steps/s with setup), "
        f"final loss {np.mean(trainer.losses[-200:]):.4f} (mean of the last 200)"
    )
    if trainer.device.type == "cuda":
        import torch

        log(f"x{scale} peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    pack(run, out, log)


def pack(run: Path, out: Path, log: Log) -> None:
    """``run`` as two files under 16 MiB each (what the device machine sends back)."""
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"{run.name}.tar"
    with tarfile.open(archive.with_suffix(".part"), "w") as tar:
        for name in SHIPPED:
            if name == "checkpoint/state.json":  # the device's absolute paths would mean nothing here
                data = json.dumps(portable_state(json.loads((run / name).read_text()))).encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.add(run / name, arcname=name.rstrip("/"))
    archive.with_suffix(".part").replace(archive)
    optimizer = out / f"{run.name}.optimizer.safetensors"
    shutil.copyfile(run / "checkpoint" / "optimizer.safetensors", optimizer)
    for path in (archive, optimizer):
        size = path.stat().st_size / 2**20
        log(f"wrote {path.name} ({size:.1f} MiB{', OVER the 16 MiB a file can come back' if size > 16 else ''})")


def portable_state(state: dict) -> dict:
    """The checkpoint's ``init`` and ``folders`` relative to the repository root where they lie inside it, as
    the configs write them: the model card here finds the photos (and their licences) by these paths."""

    def relative(path: str) -> str:
        resolved = Path(path).resolve()
        return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path

    config = dict(state["config"])
    config["init"] = relative(config["init"]) if config.get("init") else config.get("init")
    config["folders"] = [relative(folder) for folder in config.get("folders", [])]
    return {**state, "config": config}


def unpack(folder: Path, runs: Path) -> list[Path]:
    """What came back -> ``runs/superres-real-gpu-xN/{model,checkpoint}``, ready to embed or resume."""
    made = []
    for archive in sorted(Path(folder).glob("superres-real-gpu-x*.tar")):
        target = runs / archive.stem
        if (target / "checkpoint" / "state.json").exists():
            raise SystemExit(f"{target} already holds a run; move it away first")
        optimizer = archive.parent / f"{archive.stem}.optimizer.safetensors"
        if not optimizer.is_file():
            raise SystemExit(f"{optimizer.name} did not come back beside {archive.name}; fetch both")
        partial = runs / f".{archive.stem}.unpacking"
        if partial.exists():
            raise SystemExit(f"{partial} exists (an unpack stopped part-way); remove it and rerun")
        with tarfile.open(archive) as tar:  # into a sibling first: a stopped unpack leaves no half run
            tar.extractall(partial, filter="data")
        shutil.copyfile(optimizer, partial / "checkpoint" / "optimizer.safetensors")
        if target.exists():
            target.rmdir()  # empty (checked above that it holds no run); a non-empty one refuses here
        partial.rename(target)
        made.append(target)
    if not made:
        raise SystemExit(f"{folder} holds no superres-real-gpu-x*.tar")
    return made


def follow_up(scales: list[int]) -> str:
    names = " ".join(f"runs/{run_name(s)}" for s in scales)
    return (
        "Then here, from the repository root (FILES_AT: the folder the run's reply names):\n"
        "  python benchmarks/gpu_train_superres.py --unpack FILES_AT -o runs\n"
        f"  python -m difftool.training.embed superres {names} --folder superres-real --name difftool-real\n"
        "  python benchmarks/superres_inputs.py"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu-out")))
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole script")
    parser.add_argument("--scales", type=int, nargs="+", default=list(SCALES), choices=SCALES)
    parser.add_argument("--photos", type=Path, default=ROOT / "runs" / "debian-photos")
    parser.add_argument("--work", type=Path, help="run folders (default: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU, tiny sizes, seconds")
    parser.add_argument("--unpack", type=Path, metavar="FILES_AT", help="unpack what came back into -o")
    parser.add_argument("-o", "--runs", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)
    if args.unpack:
        for target in unpack(args.unpack, args.runs):
            print(f"unpacked {target}")
        return 0
    start = time.monotonic()
    import torch

    from difftool.training.data import ImagePool

    log = Log(args.out / "gpu_train_superres.log")
    if not args.dry_run and not torch.cuda.is_available():
        log("no CUDA GPU visible to PyTorch: run this on the GPU machine (or --dry-run here)")
        return 2
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "CPU (dry run)"
    log(f"{device}; torch {torch.__version__}; {os.cpu_count()} CPUs; budget {args.budget:.0f} s")
    if not args.photos.is_dir():
        log(f"{args.photos} is missing: python -m difftool.training.debian_photos {args.photos}; carry it")
        return 2
    folders = [args.photos]
    pool = ImagePool.from_sources(folders, builtin=not args.dry_run)
    log(f"{len(pool.images)} training images loaded in {time.monotonic() - start:.1f} s")
    with tempfile.TemporaryDirectory(prefix="gpu-sr-") as temporary:
        work = args.work or Path(temporary)
        deadline = start + args.budget
        for index, scale in enumerate(args.scales):
            share = (deadline - time.monotonic()) / (len(args.scales) - index)
            train_scale(scale, pool, work, args.out, time.monotonic() + share, args, log)
    log(json.dumps({"total_s": round(time.monotonic() - start, 1), "scales": args.scales}))
    log(follow_up(args.scales))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
