"""`difftool info`: one report of what an install can do (versions, imports, devices, backends, models, cache)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from difftool import cli
from difftool.info import as_text, collect


def broken_torchvision(root: Path) -> Path:
    """A torchvision that is installed but fails on import, as the registry's CUDA build does beside a CPU torch."""
    package = root / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    meta = root / "torchvision-0.29.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.29.1\n")
    return root


def test_info_json_names_every_backend_with_a_reason_when_unavailable(registry) -> None:
    result = CliRunner().invoke(cli.cli, ["info", "--json"], obj=registry)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    names = {row["name"] for row in report["backends"]}
    assert names == set(registry.backends)
    for row in report["backends"]:
        for device in ("cpu", "cuda"):
            state = row[device]
            assert state == "available" or (isinstance(state, str) and len(state) > 10), (row["name"], state)
    tensorrt = next(row for row in report["backends"] if row["name"] == "tensorrt")
    assert "GPU" in tensorrt["cpu"]
    import difftool

    assert report["difftool"]["version"] == difftool.__version__ != "0+unknown"
    deps = {row["name"]: row for row in report["dependencies"]}
    assert deps["diffusers"]["imports"] and deps["tensorrt"]["status"] in ("not installed", "ok")
    assert {"cpu", "cuda"} <= set(report["devices"]) and "bf16" in report["devices"]["cpu"]
    assert "difftool package" in report["models"]["found"] and "path" in report["cache"]
    text = CliRunner().invoke(cli.cli, ["info"]).stdout
    assert "backends:" in text and "tensorrt" in text and "dependencies:" in text


def test_a_broken_torchvision_is_revealed_with_the_fix(tmp_path: Path, registry, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(broken_torchvision(tmp_path)))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    report = collect(registry)
    row = next(r for r in report["dependencies"] if r["name"] == "torchvision")
    assert row["version"] == "0.29.1" and not row["imports"]
    assert "operator torchvision::nms does not exist" in row["status"]
    assert "does not match torch" in row["fix"] and "fix:" in as_text(report)


def test_a_cache_that_is_a_file_is_reported_not_fatal(tmp_path: Path, registry, monkeypatch) -> None:
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "f"))
    report = collect(registry)
    assert "is a file, not a folder" in report["cache"]["error"]


STANDIN_CHECK = """
import sys
from difftool.plugins.builtin.upscalers import import_spandrel
spandrel = import_spandrel()
assert spandrel.MAIN_REGISTRY.get("ESRGAN") is not None
assert "torchvision" not in sys.modules  # the stand-in was only lent to spandrel's import
try:
    import torchvision
except RuntimeError as exc:
    assert "nms" in str(exc)  # later imports see the real (broken) package, not difftool's stand-in
else:
    raise AssertionError("the stand-in leaked")
print("ok")
"""


def test_spandrel_imports_beside_a_broken_torchvision_without_leaking_a_stand_in(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken_torchvision(tmp_path)), *sys.path])}
    done = subprocess.run([sys.executable, "-c", STANDIN_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
