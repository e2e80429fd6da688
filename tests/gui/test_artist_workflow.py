"""Issue 20, round two: the desktop app as an artist uses it (offscreen; each defect's behaviour asserted)."""

from pathlib import Path

import numpy as np
import pytest
from gui_helpers import wait_for
from PIL import Image
from PySide6.QtCore import QMimeData, QPoint, QPointF, QSettings, Qt, QUrl
from PySide6.QtGui import QColor, QDropEvent, QIcon
from PySide6.QtTest import QTest

from difftool.core.images import read_metadata
from difftool.core.runtime import Runtime, using
from difftool.gui.app import MainWindow
from difftool.gui.convert import pil_to_qimage
from difftool.gui.history import describe
from difftool.gui.messages import for_the_window


def shown(window, qapp, size=(1100, 760)) -> None:
    window.resize(*size)
    window.show()
    for _ in range(10):
        qapp.processEvents()


def pixel(canvas, x: float, y: float) -> QColor:
    return canvas.grab().toImage().pixelColor(int(x), int(y))


def test_compare_divider_shows_the_whole_before_at_one_end_and_the_whole_after_at_the_other(window, qapp) -> None:
    """Defect 3: both ends of the old slider showed the result; the divider now sits on the canvas."""
    shown(window, qapp)
    window.set_source(Image.new("RGB", (40, 30), (220, 0, 0)))
    window.canvas.set_result(pil_to_qimage(Image.new("RGB", (80, 60), (0, 0, 220))))
    canvas = window.canvas
    assert not canvas.comparing() and pixel(canvas, canvas.width() / 2, canvas.height() / 2).blue() > 200
    window.compare_check.setChecked(True)
    left, right = canvas.offset.x(), canvas.offset.x() + 80 * canvas.scale
    y = canvas.offset.y() + 45 * canvas.scale  # below the labels
    xs = np.linspace(left + 4, right - 4, 12)
    canvas.set_split(1.0)
    assert all(pixel(canvas, x, y).red() > 200 for x in xs[:-1])  # all before (the divider at the right edge)
    canvas.set_split(0.0)
    assert all(pixel(canvas, x, y).blue() > 200 for x in xs[1:])  # all after
    QTest.mousePress(canvas, Qt.MouseButton.LeftButton, pos=QPoint(int(left + (right - left) / 4), int(y)))
    QTest.mouseRelease(canvas, Qt.MouseButton.LeftButton, pos=QPoint(int(left + (right - left) / 4), int(y)))
    assert canvas.split == pytest.approx(0.25, abs=0.02)
    assert pixel(canvas, left + (right - left) * 0.1, y).red() > 200
    assert pixel(canvas, left + (right - left) * 0.6, y).blue() > 200
    canvas.set_result(pil_to_qimage(Image.new("RGB", (80, 60), (0, 200, 0))))  # a live preview stays visible
    assert pixel(canvas, left + (right - left) * 0.6, y).green() > 180


def test_each_phase_of_a_job_is_shown_and_a_previous_failure_is_not(window, qapp, photo: Path) -> None:
    """Defect 4: an empty bar for seconds while loading, and "failed" left over from the previous job."""
    window.task_box.setCurrentText("inpaint")
    window.open_path(photo)
    window.run_current()  # no mask: fails
    wait_for(window.queue, qapp)
    assert "failed" in window.status.job.text()
    window.task_box.setCurrentText("superres")
    window.model_box.setCurrentIndex(1)
    seen: list[tuple[str, int, list[str]]] = []

    def record(*_args) -> None:
        rows = [window.queue_list.item(i).text() for i in range(window.queue_list.count())]
        seen.append((window.status.job.text(), window.progress.maximum(), rows))

    window.queue.signals.phase.connect(record)
    with using(Runtime()):  # nothing loaded yet: the run loads its model
        job_id = window.run_current()
        wait_for(window.queue, qapp)
    loading = [s for s in seen if "loading model tiny" in s[0]]
    assert loading, seen
    text, maximum, rows = loading[0]
    assert text.startswith(f"#{job_id} superres: loading model") and "failed" not in text
    assert maximum == 0  # a busy bar, not an empty one stuck at 0
    assert any("loading model" in row for row in rows)  # the job's row names the phase too
    assert window.status.job.text().startswith(f"#{job_id} superres: done in")
    assert window.status.image.text().startswith(f"result of #{job_id} superres")
    window.task_box.setCurrentText("inpaint")
    window.paint_check.setChecked(True)  # the source replaces the result on screen: the status says so
    assert window.status.image.text().startswith("photo.png — 28×20")


def test_errors_name_the_field_highlight_it_and_the_cli_keeps_its_words(window, qapp, photo: Path) -> None:
    """Defect 5: "pass --mask FILE" told an artist about a flag; now the Mask panel and "mask" field."""
    shown(window, qapp)
    window.task_box.setCurrentText("inpaint")
    window.open_path(photo)
    window.run_current()
    wait_for(window.queue, qapp)
    error = window.last_error
    assert "--" not in error and '"mask"' in error and "Mask panel" in error, error
    assert "border" in window.form.widgets["mask"].edit.styleSheet() and window.mask_dock.isVisible()
    from click.testing import CliRunner

    from difftool.cli import cli

    result = CliRunner().invoke(cli, ["run", "inpaint", str(photo)])
    assert result.exit_code != 0 and "pass --mask FILE" in result.output  # one source, the CLI's rendering


def test_messages_render_each_option_as_its_field() -> None:
    text, fields = for_the_window(
        "this task needs a Stable Diffusion model; pass --model PATH or a name from `difftool models`", []
    )
    assert text == 'this task needs a Stable Diffusion model; choose a model in "model" (a listed one, or Browse…)'
    assert fields == ["model"]
    text, fields = for_the_window(
        "--extend 'x' is not four pixel counts; pass --extend LEFT,RIGHT,TOP,BOTTOM", ["extend"]
    )
    assert text == '"extend" \'x\' is not four pixel counts; set "extend" to LEFT,RIGHT,TOP,BOTTOM' and fields == [
        "extend"
    ]
    text, fields = for_the_window("out.png exists; pass --overwrite to replace it", ["extend"])
    assert text == "out.png exists; pass --overwrite to replace it" and fields == []  # no such field: as it was


def test_each_task_keeps_its_last_values_in_the_window_and_across_restarts(window, qapp, tmp_path: Path) -> None:
    """Defect 7: switching task and back reset the form."""
    window.task_box.setCurrentText("dial")
    window.form.widgets["strength"].setValue(0.9)
    window.form.widgets["style"].setCurrentText("a")
    window.task_box.setCurrentText("superres")
    window.task_box.setCurrentText("dial")
    assert window.form.widgets["strength"].value() == pytest.approx(0.9)
    window.close()
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    again = MainWindow(registry=window.registry, settings=settings)
    again.task_box.setCurrentText("dial")
    assert again.form.values()["strength"] == pytest.approx(0.9) and again.form.values()["style"] == "a"
    again.close()


def test_only_what_the_task_declares_is_offered(window, qapp) -> None:
    """Defect 8: generate offered the embedded superres model; the Mask panel showed for every task."""
    shown(window, qapp)
    window.task_box.setCurrentText("generate")
    assert not any(name.startswith("embedded/") for name in window.task_panel.offered_models())
    window.task_box.setCurrentText("superres")
    offered = window.task_panel.offered_models()
    assert "embedded/superres" in offered and "embedded/inpaint" not in offered
    assert not window.mask_dock.isVisible()
    window.task_box.setCurrentText("inpaint")
    assert window.mask_dock.isVisible() and "embedded/superres" not in window.task_panel.offered_models()
    window.task_box.setCurrentText("dial")  # no model: no model, backend, device or precision rows
    for box in (window.model_box, window.backend_box, window.device_box, window.dtype_box):
        assert not box.isVisibleTo(window)


def test_saving_names_the_file_after_input_and_task_confirms_and_keeps_metadata_in_jpeg(
    window, qapp, photo: Path, tmp_path: Path
) -> None:
    """Defect 9: "result.png", no confirmation, JPEG without metadata."""
    window.task_box.setCurrentText("superres")
    window.open_path(photo)
    window.model_box.setCurrentIndex(1)
    window.seed_box.setValue(8)
    window.run_current()
    wait_for(window.queue, qapp)
    assert window.default_save_path() == photo.parent / "photo.superres.png"
    for suffix in (".jpg", ".webp"):
        saved = window.save_result(tmp_path / f"out{suffix}")
        assert str(saved) in window.statusBar().currentMessage()
        meta = read_metadata(saved)
        assert meta["difftool"]["seed"] == 8 and meta["difftool"]["task"] == "superres"
    window.send_to("inpaint")  # chained: the name tells both steps
    result = window.selected_result().image
    assert window.task_box.currentText() == "inpaint" and window.source.tobytes() == result.tobytes()
    assert window.default_save_path().name == "photo.superres.png"  # the selected result is still superres #1


def test_the_tooltip_tells_asked_and_ran_precision_apart_and_the_selected_thumbnail_is_not_tinted(
    window, qapp, photo: Path
) -> None:
    """Defect 10: dtype "bf16" beside precision "float32"; a selection tint that looked like a colour shift."""
    tip = describe({"task": "superres", "seed": 1, "backend": "onnx", "dtype": "bf16", "precision": "float32"}, "t")
    assert "precision: fp32 (asked bf16; the onnx backend ran the model in fp32)" in tip and "dtype" not in tip
    assert "precision: bf16" in describe({"dtype": "bf16", "precision": "bfloat16"}, "t")
    window.task_box.setCurrentText("superres")
    window.open_path(photo)
    window.model_box.setCurrentIndex(1)
    window.run_current()
    wait_for(window.queue, qapp)
    item = window.history_list.currentItem()
    assert item.isSelected()
    normal = item.icon().pixmap(96, QIcon.Mode.Normal).toImage()
    selected = item.icon().pixmap(96, QIcon.Mode.Selected).toImage()
    assert normal == selected


def test_dropping_a_folder_queues_each_image_as_a_batch(window, qapp, tmp_path: Path) -> None:
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (12, 10), (i * 40, 10, 10)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    window.task_box.setCurrentText("dial")
    data = QMimeData()
    data.setUrls([QUrl.fromLocalFile(str(folder))])
    event = QDropEvent(
        QPointF(5, 5), Qt.DropAction.CopyAction, data, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    )
    window.dropEvent(event)
    wait_for(window.queue, qapp)
    jobs = list(window.queue.jobs.values())
    assert [Path(j.inputs[0]).name for j in jobs] == ["0.png", "1.png", "2.png"]
    assert all(j.state == "done" for j in jobs), [j.error for j in jobs]
    assert window.history_list.count() == 3


@pytest.mark.parametrize("zoom", [2.0, 0.5])
def test_the_brush_is_sized_in_screen_pixels_and_the_overlay_colour_can_change(window, qapp, zoom: float) -> None:
    shown(window, qapp)
    window.task_box.setCurrentText("inpaint")
    window.set_source(Image.new("RGB", (200, 150), (120, 120, 120)))
    canvas = window.canvas
    canvas.fitted, canvas.scale, canvas.offset = False, zoom, QPointF(0, 0)
    window.paint_check.setChecked(True)
    window.hardness.setValue(100)
    window.brush_size.setValue(40)  # 40 screen pixels across, whatever the zoom
    centre = QPoint(int(50 * zoom), int(50 * zoom))  # image pixel (50, 50)
    QTest.mousePress(canvas, Qt.MouseButton.LeftButton, pos=centre)
    QTest.mouseRelease(canvas, Qt.MouseButton.LeftButton, pos=centre)
    row = np.asarray(window.painted_mask())[50]
    assert abs(int((row > 127).sum()) - 40 / zoom) <= 2
    window.mask_panel.pick_color(QColor(0, 255, 0))
    inside = pixel(canvas, 50 * zoom, 50 * zoom)
    assert inside.green() > inside.red() + 40  # a green overlay now, not red


def test_signals_emitted_from_python_do_not_eat_references_to_true(qapp) -> None:
    """PySide6 6.12.0's Signal.emit() returned True without a reference: after a few hundred emits (one per
    progress step, one per mouse move) CPython 3.11 freed True and the app aborted. pyproject excludes it."""
    import sys

    from PySide6.QtCore import QObject, Signal

    class Source(QObject):
        ping = Signal(int)

    source = Source()
    source.ping.connect(lambda _: None)
    before = sys.getrefcount(True)
    for i in range(200):
        source.ping.emit(i)
    assert sys.getrefcount(True) >= before - 20  # a leak of one per emit would be 200 short


def test_a_painted_mask_wins_and_no_file_is_remembered_for_it(window, qapp, tmp_path: Path, photo: Path) -> None:
    window.task_box.setCurrentText("inpaint")
    window.form.widgets["mask"].edit.setText(str(tmp_path / "old-mask.png"))
    window.task_box.setCurrentText("superres")
    window.task_box.setCurrentText("inpaint")
    assert window.form.widgets["mask"].text() == ""  # a file is never brought back for a mask
    window.form.widgets["mask"].edit.setText(str(photo))
    window.set_source(Image.new("RGB", (40, 30)))
    window.canvas.mask.brush_size = 6
    window.canvas.mask.checkpoint()
    window.canvas.mask.stroke(QPointF(10, 10), QPointF(20, 10))
    assert isinstance(window.build_job().params["mask"], Image.Image)  # what is painted on screen wins


def test_a_failed_job_speaks_for_its_own_task_after_a_switch_and_later_errors_still_work(window, qapp, photo) -> None:
    window.task_box.setCurrentText("inpaint")
    window.open_path(photo)
    window.run_current()
    window.task_box.setCurrentText("superres")  # the inpaint form (and its highlighted field) is gone
    wait_for(window.queue, qapp)
    assert "--mask" not in window.last_error and '"mask"' in window.last_error
    assert "--mask" not in window.status.job.text() and "failed" in window.status.job.text()
    window.show_error("clip skip 0 is below 1; pass --clip-skip 1")  # no stale widget to trip on
    assert window.last_error.startswith("clip skip 0")


def test_the_queue_row_follows_the_steps_and_the_status_line_survives_the_pointer(window, qapp, photo) -> None:
    window.task_box.setCurrentText("dial")
    window.form.widgets["count"].setValue(4)
    window.open_path(photo)
    rows: list[str] = []
    window.queue.signals.progress.connect(lambda *a: rows.append(window.queue_list.item(0).text()))
    window.run_current()
    wait_for(window.queue, qapp)
    stepping = [r for r in rows if "running, step" in r]  # (the last may already read "done")
    assert stepping[0].endswith("step 1 / 4") and len(set(stepping)) >= 2  # updated in place, not frozen
    window._on_hover(3, 3)
    assert window.status.image.isVisibleTo(window) and window.status.pointer.text().startswith("3, 3")


def test_painting_stops_when_a_result_takes_the_screen_or_the_task_takes_no_mask(window, qapp, photo) -> None:
    window.task_box.setCurrentText("inpaint")
    window.open_path(photo)
    window.paint_check.setChecked(True)
    window.task_box.setCurrentText("dial")
    assert not window.paint_check.isChecked() and not window.canvas.painting
    window.task_box.setCurrentText("inpaint")
    window.paint_check.setChecked(True)
    window.task_box.setCurrentText("dial")
    window.task_box.setCurrentText("inpaint")
    window.paint_check.setChecked(True)
    window.form.widgets["mask"].edit.clear()
    window.task_box.setCurrentText("dial")
    window.run_current()
    wait_for(window.queue, qapp)
    window.task_box.setCurrentText("inpaint")
    window.paint_check.setChecked(True)
    window.history_list.setCurrentRow(0)
    window._show_result(window.history_list.selected_job())
    assert not window.canvas.painting and window.canvas.after is not None


def test_history_results_compare_against_their_own_input_and_save_under_their_own_name(
    window, qapp, photo: Path, tmp_path: Path
) -> None:
    window.task_box.setCurrentText("dial")
    window.open_path(photo)
    window.run_current()
    wait_for(window.queue, qapp)
    other = tmp_path / "other.png"
    Image.new("RGB", (9, 9), (0, 255, 0)).save(other)
    window.open_path(other)
    window.run_current()
    wait_for(window.queue, qapp)
    window.history_list.setCurrentRow(0)  # the arrow keys reach it too: no click needed
    assert window.default_save_path().name == "photo.dial.png"
    assert window.canvas.compare_with.size().width() == 28  # photo.png, not other.png
    assert window.status.image.text().endswith("(from photo.png)")


def test_an_a1111_png_fills_the_generate_form_including_hires(window, qapp, tmp_path: Path) -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a castle\nNegative prompt: fog\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 7, "
        "Size: 512x768, Clip skip: 2, Denoising strength: 0.45, Hires upscale: 2, Hires upscaler: Latent",
    )
    path = tmp_path / "webui.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    window.task_box.setCurrentText("generate")
    window.reuse_file(path)
    values = window.form.values()
    assert values["prompt"] == "a castle" and values["negative_prompt"] == "fog" and values["steps"] == 30
    assert values["scheduler"] == "dpmpp-2m-karras" and values["guidance_scale"] == pytest.approx(6.5)
    assert (values["width"], values["height"], values["clip_skip"]) == (512, 768, 2)
    assert values["hires"] == pytest.approx(2.0) and values["hires_strength"] == pytest.approx(0.45)
    assert values["hires_upscaler"] == "latent" and window.seed_box.value() == 7


def test_loras_and_embeddings_are_offered_by_name_and_inserted_at_the_cursor(
    window, qapp, tmp_path: Path, monkeypatch
) -> None:
    from difftool.gui.prompt_tools import fill_insert_menu, prompt_names

    root = tmp_path / "root"
    (root / "models" / "Lora").mkdir(parents=True)
    (root / "embeddings").mkdir()
    import torch
    from safetensors.torch import save_file

    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}
    save_file(lora, str(root / "models" / "Lora" / "ink.safetensors"))  # a LoRA by its key names
    (root / "embeddings" / "EasyNegative.safetensors").write_bytes(b"")
    monkeypatch.setenv("DIFFTOOL_MODELS", str(root))
    assert prompt_names(window.registry) == (["ink"], ["EasyNegative"])
    window.task_box.setCurrentText("generate")
    window.form.widgets["prompt"].setPlainText("a harbour")
    window.form.widgets["prompt"].moveCursor(window.form.widgets["prompt"].textCursor().MoveOperation.End)
    fill_insert_menu(window.insert_menu, window)
    loras, embeddings = (action.menu() for action in window.insert_menu.actions()[:2])
    loras.actions()[0].trigger()
    embeddings.actions()[0].trigger()
    assert window.form.values()["prompt"] == "a harbour <lora:ink:1> EasyNegative"
