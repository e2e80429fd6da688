"""The reference-image (IP-Adapter) fields in the desktop app, offscreen: they come from the declaration."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6", reason="the test extra installs PySide6")

from gui_helpers import wait_for  # noqa: E402
from PIL import Image  # noqa: E402
from PySide6.QtCore import QMimeData, QPoint, QPointF, QSettings, Qt, QUrl  # noqa: E402
from PySide6.QtGui import QDragEnterEvent, QDropEvent  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from difftool.core.task import Param  # noqa: E402
from difftool.gui.app import MainWindow  # noqa: E402
from difftool.gui.form import PathField  # noqa: E402
from difftool.gui.reference_field import ReferenceImagesField, is_image_list  # noqa: E402
from difftool.plugins.registry import build_registry  # noqa: E402


def window(tmp_path: Path) -> MainWindow:
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    return MainWindow(registry=build_registry(entry_points=False), settings=settings)


def drop(widget, *urls: QUrl) -> bool:
    """Drag ``urls`` onto ``widget`` and drop them, as a file manager does (the mime data carries file URLs);
    whether the widget took the drop."""
    mime = QMimeData()
    mime.setUrls(list(urls))
    widget.window().show()  # Qt delivers drops to shown widgets only
    at, action = QPoint(5, 5), Qt.DropAction.CopyAction
    buttons, keys = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    enter = QDragEnterEvent(at, action, mime, buttons, keys)
    QApplication.sendEvent(widget, enter)
    event = QDropEvent(QPointF(at), action, mime, buttons, keys)
    QApplication.sendEvent(widget, event)
    return enter.isAccepted() and event.isAccepted()


def picture(path: Path, size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (200, 60, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.mark.parametrize("task", ["style", "generate"])
def test_reference_fields_appear_and_reach_the_request(qapp, task: str, tmp_path: Path) -> None:
    win = window(tmp_path)
    win.task_box.setCurrentText(task)
    widgets = win.form.widgets
    assert isinstance(widgets["reference"], ReferenceImagesField) and isinstance(widgets["ip_adapter"], PathField)
    mode = widgets["reference_mode"]
    assert [mode.itemText(i) for i in range(mode.count())] == ["all", "style", "composition"]
    assert win.form.values()["reference_weight"] == pytest.approx(0.6) and "reference" not in win.form.values()
    painting = picture(tmp_path / "painting.png")
    assert drop(widgets["reference"], QUrl.fromLocalFile(str(painting)))
    assert win.source is None  # the field took it: the window did not open it
    mode.setCurrentText("style")
    values = win.build_job().params
    assert values["reference"] == [str(painting)] and values["reference_mode"] == "style"
    assert win.registry.task(task).param("reference").validate(values["reference"]) == (painting,)
    win.close()


def test_dropped_images_show_as_thumbnails_bad_files_are_refused_and_clear_empties(qapp, tmp_path: Path) -> None:
    field = ReferenceImagesField(Param("reference", "path", multiple=True))
    field.show()
    assert not field.thumbs.isVisible() and field.value() is None and not field.clear_button.isEnabled()
    first = picture(tmp_path / "first.png", (120, 60))
    folder = tmp_path / "paintings"
    for i in range(6):
        picture(folder / f"p{i}.jpg", colour=(i * 40, 90, 200))
    (folder / "notes.txt").write_text("not an image, not a reference")
    drop(field, QUrl.fromLocalFile(str(first)), QUrl.fromLocalFile(str(folder)))
    assert field.value() == [str(first), str(folder)]
    assert field.thumbs.isVisible() and field.thumbs.count() == 1 + 4  # a folder shows its first four images
    icon = field.thumbs.item(0).icon().pixmap(64, 64)
    assert (icon.width(), icon.height()) == (64, 32)  # the image itself, reduced: 120x60 -> 64x32
    assert "(+2 more)" in field.thumbs.item(4).text() and field.message.text() == ""

    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))  # a PNG's signature, then noise
    text = tmp_path / "prompt.png"
    text.write_text("a lighthouse")
    drop(field, QUrl.fromLocalFile(str(fake)), QUrl.fromLocalFile(str(text)), QUrl("https://example.com/a.png"))
    assert field.value() == [str(first), str(folder)] and field.thumbs.count() == 5  # nothing bad was taken
    lines = field.message.text().splitlines()
    assert len(lines) == 3 and all(line.startswith("⚠ ") for line in lines)
    assert "fake.png" in lines[0] and "prompt.png" in lines[1] and "files on this machine" in lines[2]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert field.add_paths([empty]) == ["empty holds no images; drop image files or a folder of them"]

    field.clear_button.click()
    assert field.value() is None and field.thumbs.count() == 0 and not field.thumbs.isVisible()
    field.set_value([str(first), str(tmp_path / "gone.png")])  # reuse: the file that has gone is said
    assert field.value() == [str(first)] and "gone.png" in field.message.text()


def test_the_field_follows_the_declaration_not_the_name() -> None:
    assert is_image_list(Param("style_images", "image", multiple=True))
    assert is_image_list(Param("reference", "path", multiple=True))
    assert not is_image_list(Param("reference", "path")) and not is_image_list(Param("lora", "string", multiple=True))


@pytest.mark.slow  # ~9 s on a shared core: a tiny SD and adapter built, two runs
def test_a_dropped_reference_runs_through_the_adapter(qapp, tmp_path: Path) -> None:
    """End to end on tiny random weights: the GUI's run with a dropped reference is the API's with it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "builtin"))
    from sd import tiny, tiny_ipa

    from difftool.app import api

    parts = tiny.components(seed=2)
    model = tiny.save_folder(parts, tmp_path / "tiny-sd")
    tiny_ipa.image_encoder(seed=4).save_pretrained(tmp_path / "ipa" / "image_encoder", safe_serialization=True)
    adapter = tiny_ipa.save_adapter(tiny_ipa.adapter(parts["unet"]), tmp_path / "ipa" / "ip-adapter_tiny.safetensors")
    painting = picture(tmp_path / "painting.png", (50, 40), (30, 160, 220))
    params = dict(prompt="a lighthouse", steps=2, width=32, height=32, guidance_scale=6.0, scheduler="ddim")
    win = window(tmp_path)
    win.task_box.setCurrentText("generate")
    win.form.set_values({**params, "ip_adapter": str(adapter), "reference_weight": 0.8})
    drop(win.form.widgets["reference"], QUrl.fromLocalFile(str(painting)))
    win.model_box.insertItem(1, "tiny-sd", str(model))
    win.model_box.setCurrentIndex(1)
    win.dtype_box.setCurrentText("fp32")
    win.seed_box.setValue(7)
    job_id = win.run_current()
    wait_for(win.queue, qapp)
    job = win.queue.jobs[job_id]
    assert job.state == "done", job.error
    assert job.result.record["reference"] == ["painting.png"]
    shared = dict(model=str(model), dtype="fp32", seed=7, **params)
    expected = api.run("generate", reference=[str(painting)], ip_adapter=str(adapter), reference_weight=0.8, **shared)
    ours = np.asarray(job.result.images[0], np.int16)
    assert np.abs(ours - np.asarray(expected.images[0], np.int16)).max() == 0
    win.close()


def test_reusing_a_record_fills_the_references_that_exist_here(tmp_path: Path) -> None:
    from difftool.gui.reuse import plan_reuse

    here = picture(tmp_path / "painting.png")
    params = (Param("reference", "path", multiple=True),)
    reuse = plan_reuse({"reference": [str(here), str(tmp_path / "gone.png")]}, {}, params, trusted=False)
    assert reuse.values["reference"] == [str(here)] and reuse.files["reference"] == [str(here)]
    assert reuse.missing["reference"] == [str(tmp_path / "gone.png")] and "reference" not in reuse.without_files
