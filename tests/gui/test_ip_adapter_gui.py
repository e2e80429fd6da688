"""The reference-image (IP-Adapter) fields in the desktop app, offscreen: they come from the declaration."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6", reason="the test extra installs PySide6")

from PySide6.QtCore import QSettings  # noqa: E402

from difftool.gui.app import MainWindow  # noqa: E402
from difftool.gui.form import PathField  # noqa: E402
from difftool.plugins.registry import build_registry  # noqa: E402


@pytest.mark.parametrize("task", ["style", "generate"])
def test_reference_fields_appear_and_reach_the_request(qapp, task: str, tmp_path: Path) -> None:
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    win = MainWindow(registry=build_registry(entry_points=False), settings=settings)
    win.task_box.setCurrentText(task)
    widgets = win.form.widgets
    assert isinstance(widgets["reference"], PathField) and isinstance(widgets["ip_adapter"], PathField)
    mode = widgets["reference_mode"]
    assert [mode.itemText(i) for i in range(mode.count())] == ["all", "style", "composition"]
    assert win.form.values()["reference_weight"] == pytest.approx(0.6)
    widgets["reference"].edit.setText(str(tmp_path / "painting.png"))
    mode.setCurrentText("style")
    values = win.form.values()
    assert values["reference"] == str(tmp_path / "painting.png") and values["reference_mode"] == "style"
