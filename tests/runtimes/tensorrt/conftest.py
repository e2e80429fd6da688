"""The TensorRT tests' artifact cache: a fresh folder per test (a module may share one instead)."""

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("DIFFTOOL_CACHE", str(root))
    return root
