"""Folder job throughput: local batch vs ``--executor ray`` (2 workers) on this machine, in one run.

    pip install -e ".[ray]" && python benchmarks/scale.py      # about 3 minutes on 2 CPU cores

64 images of 128x128 (crops of scikit-image's sample photos) through the embedded 4x superres
model. Each executor runs in a fresh ``difftool`` process; Ray's start-up overhead is the time from
process start until Ray is up (measured separately with the same local ``ray.init``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from sections import update_section  # noqa: E402


def make_inputs(folder: Path, count: int = 64) -> None:
    from skimage import data

    sources = [data.coffee(), data.chelsea(), data.rocket(), data.astronaut()]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        image = sources[i % len(sources)]
        y, x = rng.integers(0, image.shape[0] - 128), rng.integers(0, image.shape[1] - 128)
        Image.fromarray(image[y : y + 128, x : x + 128]).save(folder / f"{i:03d}.png")


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "difftool", *args], check=True, capture_output=True)
    return time.perf_counter() - started


def ray_startup_seconds() -> float:
    code = (
        "import time; t = time.perf_counter()\n"
        "from difftool.app.executors.ray_data import start_ray\n"
        "ray = start_ray(); print(time.perf_counter() - t); ray.shutdown()"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in"
        make_inputs(inputs)
        common = ["run", "superres", str(inputs), "--scale", "4", "--seed", "1"]
        local = timed([*common, "-o", str(Path(tmp) / "local")])
        ray = timed([*common, "-o", str(Path(tmp) / "ray"), "--executor", "ray", "--workers", "2"])
        startup = ray_startup_seconds()
        identical = all(
            np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(Path(tmp) / "ray" / a.name)))
            for a in sorted((Path(tmp) / "local").glob("*.png"))
        )
    results = {
        "images": 64,
        "local_seconds": round(local, 1),
        "local_images_per_s": round(64 / local, 2),
        "ray_seconds": round(ray, 1),
        "ray_images_per_s": round(64 / ray, 2),
        "ray_startup_seconds": round(startup, 1),
        "identical_outputs": identical,
    }
    print(json.dumps(results, indent=2))
    (ROOT / "docs" / "benchmarks-scale.json").write_text(json.dumps(results, indent=2) + "\n")
    table = f"""## Folder jobs: local batch vs Ray Data (2 workers, this machine)

`python benchmarks/scale.py`: 64 images of 128x128, embedded superres 4x, each executor in a fresh
process (model load included).

| executor | seconds | images/s |
|---|---|---|
| local batch | {results["local_seconds"]} | {results["local_images_per_s"]} |
| `--executor ray --workers 2` | {results["ray_seconds"]} | {results["ray_images_per_s"]} |

Ray start-up (local `ray.init`): {results["ray_startup_seconds"]} s. Outputs byte-identical in pixels: {identical}.
"""
    update_section(ROOT / "docs" / "benchmarks.md", "scale-benchmark", table)


if __name__ == "__main__":
    main()
