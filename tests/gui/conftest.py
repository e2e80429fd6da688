"""GUI fixtures: one QApplication on the offscreen platform, a window with its own settings file."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6", reason="the test extra installs PySide6")

from gui_helpers import DialPlugin  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402


@pytest.fixture(scope="module")
def qapp():
    return QApplication.instance() or QApplication([])


@pytest.fixture
def window(qapp, tmp_path: Path, superres_model: Path):
    from difftool.gui.app import MainWindow
    from difftool.plugins.registry import build_registry

    registry = build_registry([DialPlugin()], entry_points=False)
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    win = MainWindow(registry=registry, settings=settings)
    win.model_box.insertItem(1, "tiny", str(superres_model))
    yield win
    win.queue.wait()
    win.close()
