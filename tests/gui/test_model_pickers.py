"""The model picker offers the listed models of the families each task runs, as its declaration says: its own
``model_families`` and those a family plugin runs it for (SD 3.5 and Flux for generate and style)."""

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6", reason="the test extra installs PySide6")

from PySide6.QtCore import QSettings  # noqa: E402

from difftool.gui.app import MainWindow  # noqa: E402
from difftool.gui.model_field import runs_family  # noqa: E402
from difftool.plugins.builtin.flow.families import FLUX_MARKER, SD3_MARKER  # noqa: E402
from difftool.plugins.registry import build_registry  # noqa: E402


def header_only(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A safetensors file with the tensor names and shapes detection reads (families are told from the header)."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: np.zeros(shape, np.float16) for name, shape in shapes.items()}, str(path))
    return path


@pytest.fixture
def flow_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    comfy = tmp_path / "ComfyUI" / "models" / "diffusion_models"
    flux = {FLUX_MARKER: (8,), "guidance_in.in_layer.weight": (4, 2), "img_in.weight": (4, 64)}
    header_only(comfy / "flux1-tiny.safetensors", flux)
    header_only(comfy / "sd3.5-tiny.safetensors", {SD3_MARKER: (6, 2)})
    monkeypatch.setenv("DIFFTOOL_MODELS", str(tmp_path / "ComfyUI"))
    return tmp_path


def test_flow_models_are_offered_for_the_tasks_their_family_runs(qapp, flow_root: Path) -> None:
    registry = build_registry(entry_points=False)
    listed = {e.name: e.family for e in registry.find_models()}
    assert listed["flux1-tiny"] == "flux" and listed["sd3.5-tiny"] == "sd3"
    settings = QSettings(str(flow_root / "settings.ini"), QSettings.Format.IniFormat)
    win = MainWindow(registry=registry, settings=settings)
    offered = {}
    for name in ("generate", "style", "inpaint", "superres", "upscale-sd"):
        win.task_box.setCurrentText(name)
        offered[name] = set(win.task_panel.offered_models())
    for name in ("generate", "style"):
        assert {"flux1-tiny", "sd3.5-tiny"} <= offered[name], name
    assert not {"flux1-tiny", "sd3.5-tiny"} & offered["superres"]
    for name, shown in offered.items():  # exactly as each task's declaration and the family plugins say
        task = registry.task(name)
        for model, family in listed.items():
            assert (model in shown) == runs_family(registry, task, family), (name, model)
    win.close()


def test_picking_a_flux_model_puts_its_familys_defaults_in_the_form(qapp, flow_root: Path) -> None:
    """Flux.1 dev runs 28 steps at distilled guidance 3.5, not SD's 7: picking it sets them, as the preflight
    does for a CLI run that names neither."""
    registry = build_registry(entry_points=False)
    settings = QSettings(str(flow_root / "settings.ini"), QSettings.Format.IniFormat)
    win = MainWindow(registry=registry, settings=settings)
    win.task_box.setCurrentText("generate")
    panel = win.task_panel
    assert panel.form is not None and panel.form.values()["guidance_scale"] == 7.0
    index = panel.model_box.findText("flux1-tiny")
    panel.model_box.setCurrentIndex(index)
    panel.model_box.activated.emit(index)
    assert (panel.form.values()["steps"], panel.form.values()["guidance_scale"]) == (28, 3.5)
    panel.form.set_values({"steps": 12})  # the user's own value stays; the family's guidance goes back to 7
    panel.model_box.insertItem(1, "sd15-tiny", str(flow_root / "sd15"))  # as Browse… adds a folder
    index = panel.model_box.findText("sd15-tiny")
    panel.model_box.setCurrentIndex(index)
    panel.model_box.activated.emit(index)
    assert (panel.form.values()["steps"], panel.form.values()["guidance_scale"]) == (12, 7.0)
    win.close()
