"""The SDXL refiner in the desktop app, offscreen: its fields, the model picker, reuse of A1111 text."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6", reason="the test extra installs PySide6")

from PySide6.QtCore import QSettings  # noqa: E402

from difftool.gui.app import MainWindow  # noqa: E402
from difftool.plugins.registry import build_registry  # noqa: E402


def test_generate_form_has_refiner_fields_and_the_picker_offers_no_refiner_as_model(
    qapp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "builtin"))
    from sd import tiny

    tiny.save_folder(tiny.components(xl=True, seed=2), tmp_path / "tiny-sdxl")
    tiny.save_folder(tiny.refiner_components(seed=5), tmp_path / "tiny-refiner")
    monkeypatch.setenv("DIFFTOOL_MODELS", str(tmp_path))
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    win = MainWindow(registry=build_registry(entry_points=False), settings=settings)
    win.task_box.setCurrentText("generate")
    offered = win.task_panel.offered_models()
    assert "tiny-sdxl" in offered and "tiny-refiner" not in offered  # a refiner only finishes: never --model
    assert win.form.values()["refiner_switch"] == pytest.approx(0.8) and "refiner" not in win.form.values()
    field = win.form.widgets["refiner"]  # the listed refiners, and only those, are offered
    assert [field.itemText(i) for i in range(field.count())] == ["(none)", "tiny-refiner"]  # no blank entry
    field.setCurrentText("tiny-refiner")
    assert win.form.values()["refiner"] == "tiny-refiner"
    win.form.reset()
    assert "refiner" not in win.form.values()
    upscaler = win.form.widgets["hires_upscaler"]
    assert [upscaler.itemText(i) for i in range(2)] == ["latent", "embedded"]
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Refiner: tiny-refiner [0123456789], Refiner switch at: 0.7")
    Image.new("RGB", (8, 8)).save(tmp_path / "webui.png", pnginfo=info)
    assert win.reuse_file(tmp_path / "webui.png")
    values = win.form.values()
    assert values["refiner"] == "tiny-refiner" and values["refiner_switch"] == pytest.approx(0.7)
    win.close()
