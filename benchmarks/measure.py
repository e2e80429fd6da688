"""What every benchmark script measures the same way: the CPU's name, a fresh process's time and peak RSS."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path


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
