"""The built wheel and sdist carry the licence, the notice and every data file the package declares."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build", reason="the test extra installs build")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        # No --sdist/--wheel: the wheel is built from the sdist, so neither can pick up stale build/ files.
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


def package_files() -> list[str]:
    """Every non-Python file under difftool/ in the checkout (git's list where there is one)."""
    listed = subprocess.run(["git", "ls-files", "difftool"], cwd=ROOT, capture_output=True, text=True)
    names = (
        listed.stdout.split()
        if listed.returncode == 0 and listed.stdout
        else [str(p.relative_to(ROOT)) for p in (ROOT / "difftool").rglob("*") if p.is_file()]
    )
    return sorted(n for n in names if not n.endswith((".py", ".pyc")) and "__pycache__" not in n)


def test_the_wheel_holds_licence_notice_models_and_every_data_file(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert {f"{info}/licenses/LICENSE", f"{info}/licenses/NOTICE"} <= names
    declared = package_files()
    missing = [n for n in declared if n not in names]
    assert not missing, f"the wheel lacks {missing[:5]}"
    stale = [n for n in names if n.startswith("difftool/") and not n.endswith(".py") and n not in declared]
    assert not stale, f"the wheel holds files the checkout does not: {stale[:5]}"
    weights = [n for n in names if n.startswith("difftool/models/") and n.endswith(".safetensors")]
    assert any("/superres/" in n for n in weights) and any("/inpaint/" in n for n in weights)
    print(f"wheel {wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB")


def test_the_sdist_holds_licence_and_notice(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    names = {Path(n).name for n in tarfile.open(sdist).getnames()}
    assert {"LICENSE", "NOTICE", "pyproject.toml"} <= names
