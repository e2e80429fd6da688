"""Soak: 200 consecutive superres jobs in one process; RSS must not grow more than 10% after warm-up.

python benchmarks/soak.py       # about 2 minutes on 2 CPU cores; updates docs/benchmarks.md
"""

from __future__ import annotations

import gc
import json
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

JOBS, WARM_UP = 200, 20


def rss_mib() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def main() -> None:
    from difftool.app import api
    from difftool.core.images import save_image

    rng = np.random.default_rng(0)
    samples: list[float] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(JOBS):
            size = (48 + 8 * (i % 4), 40 + 8 * (i % 3))  # a few sizes, as a real folder has
            image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
            result = api.run("superres", image, scale="2", seed=i)
            save_image(result.image, Path(tmp) / "out.png", result.record)
            gc.collect()
            samples.append(rss_mib())
    after_warm_up = samples[WARM_UP - 1]
    results = {
        "jobs": JOBS,
        "seconds": round(time.perf_counter() - started, 1),
        "rss_after_warm_up_mib": round(after_warm_up, 1),
        "rss_end_mib": round(samples[-1], 1),
        "rss_max_mib": round(max(samples[WARM_UP:]), 1),
        "growth_after_warm_up_pct": round(100 * (samples[-1] - after_warm_up) / after_warm_up, 2),
    }
    print(json.dumps(results, indent=2))
    (ROOT / "docs" / "benchmarks-soak.json").write_text(json.dumps(results, indent=2) + "\n")
    table = f"""## Soak: {JOBS} superres jobs in one process (`python benchmarks/soak.py`)

RSS after {WARM_UP} jobs (warm-up): {results["rss_after_warm_up_mib"]} MiB; after all {JOBS}:
{results["rss_end_mib"]} MiB (max {results["rss_max_mib"]} MiB); growth after warm-up
{results["growth_after_warm_up_pct"]}% (limit 10%). {results["seconds"]} s in all.
"""
    update_section(ROOT / "docs" / "benchmarks.md", "soak-benchmark", table)


if __name__ == "__main__":
    main()
