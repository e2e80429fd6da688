"""The ControlNet units editor: its value is the ``--control`` text, it reads units back from a PNG's
A1111 text, and its preview runs the registered preprocessor on the unit's (or the window's) image."""

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6", reason="the test extra installs PySide6")

from PIL import Image  # noqa: E402

from difftool.core.metadata import params_from_a1111, parse_parameters  # noqa: E402
from difftool.gui.control_units import PREVIEW_SIDE, ControlUnitsField  # noqa: E402
from difftool.gui.form import ParamForm  # noqa: E402
from difftool.plugins.builtin.sd import preprocessors  # noqa: E402
from difftool.plugins.builtin.sd.control import ControlUnit, parse_unit  # noqa: E402
from difftool.plugins.registry import build_registry  # noqa: E402


@pytest.fixture(scope="module")
def registry():
    return build_registry([], entry_points=False)


@pytest.fixture
def form(qapp, registry) -> ParamForm:
    task = registry.task("generate")
    editors = {"control": lambda param: ControlUnitsField(["cn-canny", "cn-tile"], registry)}
    return ParamForm(task, {}, editors)


@pytest.fixture
def edges_photo(tmp_path: Path) -> Path:
    """A 600 x 400 picture with a bright square: clear edges, larger than the preview."""
    rgb = np.full((400, 600, 3), 30, np.uint8)
    rgb[100:300, 200:400] = 220
    path = tmp_path / "square.png"
    Image.fromarray(rgb).save(path)
    return path


def test_a_unit_edited_in_the_form_is_the_cli_text(form: ParamForm, edges_photo: Path) -> None:
    field = form.widgets["control"]
    assert isinstance(field, ControlUnitsField) and form.values().get("control") is None  # no unit, no key
    box = field.add()
    assert [box.model.itemText(i) for i in range(box.model.count())] == ["cn-canny", "cn-tile"]
    box.model.setCurrentText("cn-canny")
    box.image.edit.setText(str(edges_photo))
    box.pre.setCurrentText("canny")
    assert box.options.placeholderText() == "low=100, high=200"  # the preprocessor's declared options
    box.options.setText("low=50")
    box.weight.setValue(0.8)
    box.end.setValue(0.6)
    box.guess.setChecked(True)
    box.resize.setCurrentText("Resize and Fill")
    text = f"cn-canny={edges_photo},pre=canny,weight=0.8,start=0,end=0.6,guess=1,resize=fill,low=50"
    assert form.values()["control"] == [text]
    unit = parse_unit(text)
    assert unit == ControlUnit("cn-canny", str(edges_photo), "canny", 0.8, 0.0, 0.6, True, (("low", "50"),), "fill")

    form.reset()
    assert field.boxes == [] and "control" not in form.values()
    form.set_values({"control": [text, "cn-tile,pre=tile,weight=0.5"]})
    assert [box.title() for box in field.boxes] == ["ControlNet 1", "ControlNet 2"]
    assert form.values()["control"] == [text, "cn-tile,pre=tile,weight=0.5,start=0,end=1"]
    field.remove(field.boxes[0])
    assert field.boxes[0].title() == "ControlNet 1" and len(form.values()["control"]) == 1


def test_units_come_back_from_a1111_text(form: ParamForm) -> None:
    text = (
        "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
        'ControlNet 0: "Module: canny, Model: cn-canny [0123abcd], Weight: 0.7, Resize Mode: Crop and Resize, '
        "Low Vram: False, Processor Res: 512, Threshold A: 64, Threshold B: 180, Guidance Start: 0.1, "
        'Guidance End: 0.9, Pixel Perfect: False, Control Mode: Balanced"'
    )
    form.set_values(params_from_a1111(parse_parameters(text)))
    (box,) = form.widgets["control"].boxes
    assert (box.model.currentText(), box.pre.currentText(), box.weight.value()) == ("cn-canny", "canny", 0.7)
    assert (box.start.value(), box.end.value(), box.guess.isChecked()) == (0.1, 0.9, False)
    assert box.image.text() == "" and box.options.text() == "low=64,high=180"  # A1111 records no image
    assert box.resize.currentText() == "Crop and Resize"


def test_preview_runs_the_preprocessor_on_a_reduced_copy(form: ParamForm, edges_photo: Path) -> None:
    box = form.widgets["control"].add()
    box.image.edit.setText(str(edges_photo))
    box.pre.setCurrentText("canny")
    box.options.setText("low=50,high=120")
    box.show_preview()  # no model named yet: a preview needs none
    out = box.preview_array
    assert out is not None and max(out.shape[:2]) == PREVIEW_SIDE and out.shape[:2] == (256, 384)
    reduced = Image.open(edges_photo).convert("RGB")
    reduced.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
    expected = preprocessors.canny(np.asarray(reduced, np.float32) / 255.0, None, low=50.0, high=120.0)
    np.testing.assert_array_equal(out, expected)
    assert 0.005 < (out[..., 0] > 0.5).mean() < 0.05  # the square's outline, not the whole picture
    assert not box.preview_label.pixmap().isNull()

    box.options.setText("radius=3")
    box.show_preview()
    assert box.preview_array is None and box.preview_label.text() == (
        "⚠ preprocessor canny has no option 'radius'; it takes: low, high"
    )


def test_preview_without_an_image_uses_the_window_image(qapp, registry) -> None:
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, 30:] = 255
    field = ControlUnitsField([], registry, source=lambda: Image.fromarray(rgb))
    box = field.add()
    box.pre.setCurrentText("invert")
    box.show_preview()
    assert box.preview_array is not None and box.preview_array.shape == (40, 60, 3)
    assert box.preview_array[0, 0, 0] == 1.0 and box.preview_array[0, -1, 0] == 0.0

    empty = ControlUnitsField([], registry).add()
    empty.show_preview()
    assert empty.preview_array is None and "no control image" in empty.preview_label.text()


def test_the_window_offers_the_editor_for_sd_tasks(window, qapp, photo: Path) -> None:
    window.task_box.setCurrentText("generate")
    field = window.form.widgets["control"]
    assert isinstance(field, ControlUnitsField)
    window.open_path(photo)
    box = field.add()
    box.show_preview()  # pre=none on the open image
    assert box.preview_array is not None and box.preview_array.shape == (20, 28, 3)
    window.task_box.setCurrentText("superres")
    assert "control" not in window.form.widgets
