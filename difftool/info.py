"""``difftool info``: what this install can do, in one report to paste into a bug report.

Versions of difftool, Python, torch and every optional dependency (and whether each imports, with the
fix when one is broken), devices, each backend's availability on each device with its reason, model
roots and what they hold, the artifact cache, and plugins loaded and failed. The CLI prints it (or
``--json``); the desktop app shows it under Help > About.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

from difftool.core.task import RegistryView

#: distribution name -> module to import; what each enables.
OPTIONAL: dict[str, tuple[str, str]] = {
    "diffusers": ("diffusers", "models, schedulers (required)"),
    "transformers": ("transformers", "Stable Diffusion text encoders (required)"),
    "safetensors": ("safetensors", "weights (required)"),
    "onnx": ("onnx", "--backend onnx export"),
    "onnxruntime": ("onnxruntime", "--backend onnx"),
    "onnxruntime-gpu": ("onnxruntime", "--backend onnx on CUDA"),
    "tensorrt": ("tensorrt", "--backend tensorrt"),
    "spandrel": ("spandrel", "community upscalers (superres --model X.pth)"),
    "torchvision": ("torchvision", "two of spandrel's architectures (LaMa, RestoreFormer); nothing else"),
    "PySide6-Essentials": ("PySide6", "difftool gui"),
    "ray": ("ray", "--executor ray"),
    "tritonclient": ("tritonclient.grpc", "the Triton backend"),
    "scikit-image": ("skimage", "difftool train, benchmarks"),
    "opencv-python-headless": ("cv2", "benchmarks (Telea inpainting)"),
}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def dependency(distribution: str, module: str, purpose: str, torch_version: str | None) -> dict[str, Any]:
    """Whether ``distribution`` is installed and its module imports; a fix when it does not."""
    version = _version(distribution)
    row: dict[str, Any] = {"name": distribution, "version": version, "for": purpose, "imports": False}
    if version is None:
        row["status"] = "not installed"
        return row
    try:
        if module == "spandrel":
            from difftool.plugins.builtin.upscalers import import_spandrel

            import_spandrel()  # the way difftool imports it (torchvision stand-in where needed)
        else:
            importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - reporting any import failure is the point
        row["status"] = f"fails to import: {_first_line(exc)[:200]}"
        if distribution == "torchvision":
            row["fix"] = (
                f"torchvision {version} does not match torch {torch_version}: install the pair that matches "
                "(pip install torch==X torchvision==Y from the same index) or pip uninstall torchvision"
            )
        else:
            row["fix"] = f"reinstall it: pip install --force-reinstall {distribution}"
        return row
    row["imports"], row["status"] = True, "ok"
    return row


def devices() -> dict[str, Any]:
    from difftool.core.devices import cpu_supports_bf16

    found: dict[str, Any] = {
        "cpu": {
            "name": _cpu_name(),
            "cores": os.cpu_count(),
            "bf16": cpu_supports_bf16(),
        },
        "cuda": [],
    }
    try:
        import torch

        found["cpu"]["torch_threads"] = torch.get_num_threads()
        found["cuda_build"] = torch.version.cuda
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            found["cuda"].append(
                {
                    "device": f"cuda:{index}",
                    "name": props.name,
                    "memory_gib": round(props.total_memory / 2**30, 2),
                    "compute_capability": f"{props.major}.{props.minor}",
                }
            )
    except Exception as exc:  # noqa: BLE001 - a broken CUDA setup is exactly what this should show
        found["cuda_error"] = _first_line(exc)
    return found


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def backends(registry: RegistryView, device_names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name, entry in sorted(registry.backends.items()):
        backend, plugin = entry.value, entry.plugin
        availability = {}
        for device in device_names:
            try:
                reason = backend.unavailable_reason(device)
            except Exception as exc:  # noqa: BLE001 - a plugin's check that raises is reported, not fatal
                reason = f"the availability check raised {_first_line(exc)}"
            availability[device] = "available" if reason is None else reason
        try:  # the values this install would use (environment defaults included): what a bug report needs
            options = backend.validate_options({})
        except Exception as exc:  # noqa: BLE001 - a bad environment default is reported, not fatal
            options = {"error": _first_line(exc)}
        row = {"name": name, "plugin": plugin, "summary": getattr(backend, "summary", ""), **availability}
        rows.append({**row, "options": options})
    return rows


def models(registry: RegistryView) -> dict[str, Any]:
    from difftool.plugins.builtin.models import model_roots

    entries = registry.find_models()
    by_root: dict[str, list[str]] = {}
    for entry in entries:
        by_root.setdefault(entry.source, []).append(f"{entry.name} ({entry.family})")
    return {
        "roots": [{"path": str(root), "exists": root.is_dir()} for root in model_roots()],
        "found": by_root,
    }


def cache() -> dict[str, Any]:
    from difftool.core.errors import DifftoolError
    from difftool.exporters.cache import cache_root

    try:
        root = cache_root()
    except DifftoolError as error:
        return {"error": str(error)}
    size, entries = 0, 0
    if root.is_dir():
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                size += path.stat().st_size
                entries += path.name == "manifest.json"
    return {"path": str(root), "exists": root.is_dir(), "entries": entries, "size_mib": round(size / 2**20, 1)}


def collect(registry: RegistryView | None = None) -> dict[str, Any]:
    """Everything ``difftool info`` reports, as plain JSON-able data."""
    import difftool
    from difftool.plugins.registry import get_registry

    registry = registry or get_registry()
    torch_version = _version("torch")
    found_devices = devices()
    device_names = ["cpu"] + [d["device"] for d in found_devices["cuda"]]
    if not found_devices["cuda"]:
        device_names.append("cuda")  # so the report says why each backend cannot use a GPU here
    return {
        "difftool": {"version": difftool.__version__, "location": str(Path(difftool.__file__).parent)},
        "python": {"version": platform.python_version(), "executable": sys.executable, "platform": platform.platform()},
        "torch": {"version": torch_version},
        "environment": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "DIFFTOOL_MODELS", "DIFFTOOL_CACHE")},
        "dependencies": [dependency(d, m, p, torch_version) for d, (m, p) in OPTIONAL.items()],
        "devices": found_devices,
        "backends": backends(registry, device_names),
        "models": models(registry),
        "cache": cache(),
        "plugins": {
            "loaded": [
                {"name": p.name, "builtin": p.builtin, "version": p.version, "registered": p.registered}
                for p in registry.plugins.values()
            ],
            "failed": [str(f) for f in registry.failures],
        },
    }


def as_text(report: dict[str, Any]) -> str:
    """The report for humans (and for pasting into an issue)."""
    out = [
        f"difftool {report['difftool']['version']} ({report['difftool']['location']})",
        f"Python {report['python']['version']} on {report['python']['platform']}",
        f"torch {report['torch']['version']}",
        "environment: " + ", ".join(f"{k}={v}" for k, v in report["environment"].items() if v is not None),
        "",
        "dependencies:",
    ]
    for row in report["dependencies"]:
        line = f"  {row['name']:<24} {row['version'] or '-':<14} {row['status']}  [{row['for']}]"
        out.append(line + (f"\n    fix: {row['fix']}" if row.get("fix") else ""))
    cpu = report["devices"]["cpu"]
    out += ["", "devices:", f"  cpu: {cpu['name']}, {cpu['cores']} cores, bf16 {'yes' if cpu['bf16'] else 'no'}"]
    for gpu in report["devices"]["cuda"]:
        out.append(f"  {gpu['device']}: {gpu['name']}, {gpu['memory_gib']} GiB, sm {gpu['compute_capability']}")
    if not report["devices"]["cuda"]:
        out.append(
            "  cuda: none" + (f" ({report['devices']['cuda_error']})" if "cuda_error" in report["devices"] else "")
        )
    out += ["", "backends:"]
    for row in report["backends"]:
        states = "; ".join(f"{k}: {v}" for k, v in row.items() if k not in ("name", "plugin", "summary"))
        out.append(f"  {row['name']} ({row['plugin']}): {states}")
    out += ["", "model roots:"]
    for root in report["models"]["roots"]:
        held = report["models"]["found"].get(root["path"], [])
        out.append(f"  {root['path']}{'' if root['exists'] else ' (missing)'}: {', '.join(held) or 'no models'}")
    for root, held in report["models"]["found"].items():
        if root not in {r["path"] for r in report["models"]["roots"]}:
            out.append(f"  {root}: {', '.join(held)}")
    cache_info = report["cache"]
    out += [
        "",
        "cache: "
        + (
            cache_info["error"]
            if "error" in cache_info
            else f"{cache_info['path']}, {cache_info['entries']} artifacts, {cache_info['size_mib']} MiB"
        ),
    ]
    out += ["", "plugins: " + ", ".join(p["name"] for p in report["plugins"]["loaded"])]
    out += [f"  FAILED {failure}" for failure in report["plugins"]["failed"]]
    return "\n".join(out)
