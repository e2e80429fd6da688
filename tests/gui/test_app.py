"""The desktop app, offscreen: generated forms, the job queue, mask painting, saving, errors."""

import os
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6", reason="the test extra installs PySide6")

from gui_helpers import Dial, DialPlugin, wait_for  # noqa: E402
from PIL import Image  # noqa: E402
from PySide6.QtCore import QPointF, QSettings  # noqa: E402
from PySide6.QtWidgets import (  # noqa: E402
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QPlainTextEdit,
    QSpinBox,
)

from difftool.core.images import read_metadata  # noqa: E402
from difftool.core.task import Task, TaskResult  # noqa: E402
from difftool.gui.app import MainWindow  # noqa: E402
from difftool.gui.form import ParamForm  # noqa: E402
from difftool.gui.job_queue import Job, JobQueue  # noqa: E402
from difftool.plugins import hookimpl  # noqa: E402
from difftool.plugins.registry import build_registry  # noqa: E402


def test_third_party_task_gets_a_working_form(qapp) -> None:
    registry = build_registry([DialPlugin()], entry_points=False)
    form = ParamForm(registry.task("dial"), {})
    assert isinstance(form.widgets["strength"], QDoubleSpinBox) and form.widgets["strength"].maximum() == 1
    assert isinstance(form.widgets["count"], QSpinBox) and form.widgets["count"].value() == 3
    assert isinstance(form.widgets["flip"], QCheckBox) and form.widgets["flip"].isChecked()
    assert isinstance(form.widgets["style"], QComboBox) and form.widgets["style"].currentText() == "b"
    assert form.widgets["strength"].toolTip().startswith("how strong")
    form.widgets["count"].setValue(7)
    assert form.values() == {"strength": 0.4, "count": 7, "flip": True, "style": "b"}
    form.reset()
    assert form.values()["count"] == 3


def test_builtin_task_form_leaves_model_defaults_unset(qapp) -> None:
    registry = build_registry(entry_points=False)
    form = ParamForm(registry.task("superres"), {"scheduler": tuple(registry.schedulers), "scale": ("2", "4")})
    values = form.values()
    # scale too: the embedded model's default (4x) or a community upscaler's own scale
    assert "steps" not in values and "scheduler" not in values and "scale" not in values


def test_run_superres_from_the_window_and_save_with_metadata(window, qapp, photo: Path, tmp_path: Path) -> None:
    window.task_box.setCurrentText("superres")
    window.open_path(photo)
    window.model_box.setCurrentIndex(1)
    window.form.widgets["scale"].setCurrentText("2")
    window.seed_box.setValue(5)
    job_id = window.run_current()
    wait_for(window.queue, qapp)
    job = window.queue.jobs[job_id]
    assert job.state == "done", job.error
    assert window.canvas.after is not None and window.canvas.after.width() == 56
    assert window.history_list.count() == 1 and window.progress.value() == window.progress.maximum()
    saved = window.save_result(tmp_path / "out.png")
    assert read_metadata(saved)["difftool"]["seed"] == 5


def test_cancelling_a_queued_job_leaves_the_running_one(window, qapp) -> None:
    window.task_box.setCurrentText("dial")
    window.set_source(Image.new("RGB", (8, 8)))
    first = window.queue.submit(Job("dial", [window.source], {"count": 5}, {"registry": window.registry}))
    second = window.queue.submit(Job("dial", [window.source], {"count": 5}, {"registry": window.registry}))
    window.queue.cancel(second)
    wait_for(window.queue, qapp)
    assert window.queue.jobs[first].state == "done"
    assert window.queue.jobs[second].state == "cancelled"


def test_cancel_stops_the_running_job_within_a_step(window, qapp) -> None:
    steps = []
    job = Job("dial", [Image.new("RGB", (4, 4))], {"count": 9}, {"registry": window.registry})
    window.queue.signals.progress.connect(lambda jid, step, total, p: (steps.append(step), window.queue.cancel(jid)))
    window.queue.submit(job)
    wait_for(window.queue, qapp)
    assert job.state == "cancelled" and len(steps) <= 2


def test_painted_mask_is_exactly_what_the_task_receives(window, qapp) -> None:
    window.task_box.setCurrentText("inpaint")
    window.set_source(Image.new("RGB", (40, 30), (20, 40, 60)))
    window.paint_check.setChecked(True)
    window.hardness.setValue(100)
    mask = window.canvas.mask
    mask.brush_size = 6  # in image pixels: the strokes below are in image coordinates
    mask.checkpoint()
    mask.stroke(QPointF(10, 10), QPointF(20, 10))
    painted = window.painted_mask()
    job = window.build_job()
    assert job.params["mask"].tobytes() == painted.tobytes() and job.params["mask"].mode == "L"
    array = np.asarray(painted)
    assert array.shape == (30, 40) and array[10, 15] == 255 and array[25, 35] == 0
    mask.invert()
    assert np.asarray(window.painted_mask())[25, 35] == 255
    mask.undo()
    assert np.asarray(window.painted_mask())[25, 35] == 0
    mask.undo()
    assert window.painted_mask() is None
    mask.redo()
    assert np.asarray(window.painted_mask())[10, 15] == 255


def test_failing_task_shows_the_one_line_error_and_the_app_goes_on(window, qapp, photo: Path) -> None:
    window.task_box.setCurrentText("superres")
    window.open_path(photo)
    window.model_box.setCurrentIndex(0)
    window.model_box.insertItem(1, "missing", "/nonexistent/model")
    window.model_box.setCurrentIndex(1)
    job_id = window.run_current()
    wait_for(window.queue, qapp)
    assert window.queue.jobs[job_id].state == "failed"
    assert "not found" in window.last_error
    window.open_path(Path("/nonexistent.png"))
    assert "no such file" in window.last_error


def test_reuse_parameters_from_a_png(window, qapp, tmp_path: Path) -> None:
    from difftool.core.images import save_image

    path = save_image(
        Image.new("RGB", (8, 8)), tmp_path / "made.png", {"task": "dial", "count": 8, "strength": 0.9, "seed": 77}
    )
    window.task_box.setCurrentText("superres")
    window.open_path(path)  # opening sets the input only (issue 34, item 1); reusing is its own action
    assert window.task_box.currentText() == "superres" and window.seed_box.value() == -1
    assert window.reuse_file(path)
    assert window.task_box.currentText() == "dial"
    assert window.form.values()["count"] == 8 and window.seed_box.value() == 77


def test_backends_show_availability(window) -> None:
    model = window.backend_box.model()
    names = [window.backend_box.itemText(i) for i in range(window.backend_box.count())]
    assert "torch" in names and "tensorrt" in names
    trt = names.index("tensorrt")
    assert not model.item(trt).isEnabled()
    assert "cuda" in window.backend_box.itemData(trt, 3).lower()  # tooltip role: the reason


def test_screenshot(window, qapp, photo: Path, tmp_path: Path) -> None:
    window.resize(1100, 700)
    window.task_box.setCurrentText("superres")
    window.open_path(photo)
    window.show()
    qapp.processEvents()
    shot = window.grab()
    assert not shot.isNull()
    if os.environ.get("DIFFTOOL_SCREENSHOT"):
        shot.save(os.environ["DIFFTOOL_SCREENSHOT"])
    from difftool.gui.convert import qimage_to_pil

    # The photo is on screen: its gradient gives the canvas hundreds of colours (an empty canvas has a few).
    canvas = np.asarray(qimage_to_pil(window.canvas.grab().toImage()).convert("RGB"))
    assert len(np.unique(canvas.reshape(-1, 3), axis=0)) > 100
    assert window.task_box.currentText() == "superres" and window.form.task.name == "superres"


def test_gui_run_gives_the_same_pixels_as_the_cli(window, qapp, photo: Path, superres_model: Path, tmp_path):
    from click.testing import CliRunner

    from difftool import cli

    window.task_box.setCurrentText("superres")
    window.open_path(photo)
    window.model_box.setCurrentIndex(1)
    window.form.widgets["scale"].setCurrentText("2")
    window.seed_box.setValue(11)
    job_id = window.run_current()
    wait_for(window.queue, qapp)
    gui_pixels = np.asarray(window.queue.jobs[job_id].result.image)
    out = tmp_path / "cli.png"
    result = CliRunner().invoke(
        cli.cli,
        ["run", "superres", str(photo), "--model", str(superres_model), "--scale", "2", "--seed", "11", "-o", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert np.array_equal(gui_pixels, np.asarray(Image.open(out)))


def test_cancel_mid_run_adds_no_result(window, qapp) -> None:
    window.task_box.setCurrentText("dial")
    window.set_source(Image.new("RGB", (8, 8)))
    window.form.widgets["count"].setValue(9)
    window.queue.signals.progress.connect(lambda jid, step, total, p: step == 2 and window.cancel_running())
    job_id = window.run_current()
    wait_for(window.queue, qapp)
    assert window.queue.jobs[job_id].state == "cancelled"
    assert window.history_list.count() == 0 and window.selected_result() is None


def test_dropping_a_png_with_a1111_metadata_opens_it_and_reuse_restores_parameters(window, qapp, tmp_path) -> None:
    from PIL import PngImagePlugin
    from PySide6.QtCore import QMimeData, QPoint, Qt, QUrl
    from PySide6.QtGui import QDropEvent

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a castle\nSteps: 6, Sampler: Euler a, Seed: 4242, difftool task: superres")
    path = tmp_path / "from-webui.png"
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    event = QDropEvent(
        QPoint(5, 5), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    )
    window.dropEvent(event)
    assert window.source is not None and window.seed_box.value() == -1
    assert window.reuse_file(path)
    assert window.task_box.currentText() == "superres"
    assert window.form.values()["steps"] == 6 and window.seed_box.value() == 4242
    assert window.source is not None and window.source.size == (16, 16)


def test_a_plugin_that_raises_does_not_break_the_window(qapp, tmp_path: Path) -> None:
    class Raising:
        @hookimpl
        def register_tasks(self, register):
            raise RuntimeError("plugin bug")

    registry = build_registry([Raising(), DialPlugin()], entry_points=False)
    win = MainWindow(registry=registry, settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    names = [win.task_box.itemText(i) for i in range(win.task_box.count())]
    assert "dial" in names and "superres" in names
    assert "plugin(s) failed" in win.statusBar().currentMessage()
    win.close()


def test_the_form_of_every_registered_task_matches_its_declaration(qapp) -> None:
    from difftool.app.api import param_choices
    from difftool.gui.form import PathField

    registry = build_registry([DialPlugin()], entry_points=False)
    kinds = {
        "int": QSpinBox,
        "float": QDoubleSpinBox,
        "bool": QCheckBox,
        "choice": QComboBox,
        "image": PathField,
        "mask": PathField,
        "path": PathField,
    }
    for name in registry.tasks:
        task = registry.task(name)
        choices = {p.name: param_choices(p, registry) for p in task.params if p.type == "choice"}
        form = ParamForm(task, choices)
        assert list(form.widgets) == [p.name for p in task.params], name
        for param in task.params:
            widget = form.widgets[param.name]
            if param.type in kinds:
                assert isinstance(widget, kinds[param.type]), (name, param.name)
            if param.type == "choice":
                offered = [widget.itemText(i) for i in range(widget.count())]
                assert {str(c) for c in choices[param.name]} <= set(offered), (name, param.name)
            if param.type in ("int", "float") and param.max is not None:
                assert widget.maximum() == param.max, (name, param.name)
        values = form.values()
        for param in task.params:  # untouched form = the declared defaults
            if param.default is not None:
                assert values[param.name] == param.default, (name, param.name)
            else:
                assert param.name not in values, (name, param.name)


class Hang(Task):
    name = "hang"
    summary = "Blocks in plugin code and never checks for cancel"
    release = __import__("threading").Event()

    def run(self, request, context):
        Hang.release.wait(60)
        return TaskResult([request.inputs["image"].to_pil()], {})


class HangPlugin:
    @hookimpl
    def register_tasks(self, register):
        register(Hang)
        register(Dial)


def test_a_hung_task_is_abandoned_on_cancel_and_the_queue_goes_on(qapp) -> None:
    registry = build_registry([HangPlugin()], entry_points=False)
    queue = JobQueue()
    queue.abandon_after_ms = 200
    image = Image.new("RGB", (4, 4))
    hung = Job("hang", [image], {}, {"registry": registry})
    queue.submit(hung)
    time.sleep(0.3)  # let it get inside the task's run()
    queue.cancel(hung.id)
    deadline = time.monotonic() + 10
    while hung.state != "cancelled" and time.monotonic() < deadline:
        qapp.processEvents()
        time.sleep(0.01)
    assert hung.state == "cancelled" and "abandoned" in hung.error
    follow = Job("dial", [image], {"count": 2}, {"registry": registry})
    queue.submit(follow)
    while follow.state not in ("done", "failed") and time.monotonic() < deadline:
        qapp.processEvents()
        time.sleep(0.01)
    assert follow.state == "done"  # the window's queue kept working while the hung thread sat there
    Hang.release.set()
    assert queue.wait(10_000)
    for _ in range(20):
        qapp.processEvents()
    assert hung.state == "cancelled" and hung.result is None  # its late result is discarded


def test_generate_runs_from_the_window_with_a_single_file_checkpoint(qapp, tmp_path: Path, monkeypatch) -> None:
    """A task without an input image and an SD checkpoint picked with "Browse file…"."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "builtin"))
    from sd import tiny

    from difftool.gui import task_panel

    checkpoint = tiny.save_single_file(tiny.components(seed=1), tmp_path / "tiny.safetensors")
    monkeypatch.setattr(task_panel.QFileDialog, "getOpenFileName", lambda *a, **k: (str(checkpoint), ""))
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    win = MainWindow(registry=build_registry(entry_points=False), settings=settings)
    win.task_box.setCurrentText("generate")
    win.model_box.setCurrentIndex(win.model_box.findText("Browse file…"))
    win.task_panel._on_model_picked(win.model_box.currentIndex())
    assert win.model_box.currentData() == str(checkpoint)
    win.form.widgets["prompt"].setPlainText("a boat")
    win.form.widgets["width"].setValue(16)
    win.form.widgets["height"].setValue(16)
    win.form.widgets["steps"].setValue(2)
    job = win.build_job()
    assert job.inputs == [] and job.options["model"] == str(checkpoint)
    win.queue.submit(job)
    wait_for(win.queue, qapp)
    assert job.state == "done", job.error
    assert job.result.image.size == (16, 16) and job.result.record["model"] == "tiny"
    win.close()


def test_a_community_upscaler_from_the_model_picker(qapp, tmp_path: Path, photo: Path, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from difftool.plugins.builtin.upscalers import import_spandrel

    import_spandrel()
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    (tmp_path / "models" / "upscale_models").mkdir(parents=True)
    state = {k: v.contiguous() for k, v in Compact(num_feat=8, num_conv=2, upscale=4).state_dict().items()}
    save_file(state, tmp_path / "models" / "upscale_models" / "4x-Tiny.safetensors")
    monkeypatch.setenv("DIFFTOOL_MODELS", str(tmp_path / "models"))
    registry = build_registry([], entry_points=False)
    win = MainWindow(registry=registry, settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    try:
        index = win.model_box.findText("4x-Tiny")
        assert index > 0  # listed by the picker like any model
        win.task_box.setCurrentText("superres")
        win.open_path(photo)
        win.model_box.setCurrentIndex(index)
        job_id = win.run_current()
        wait_for(win.queue, qapp)
        job = win.queue.jobs[job_id]
        assert job.state == "done", job.error
        assert job.result.image.size == (28 * 4, 20 * 4)  # the model's own 4x, --scale left at its default
        assert job.result.record["architecture"] and job.result.record["model"] == "4x-Tiny"
    finally:
        win.queue.wait()
        win.close()


def test_help_about_shows_the_info_report(window, qapp) -> None:
    import difftool

    dialog = window.show_about()
    text = dialog.findChild(QPlainTextEdit).toPlainText()
    assert text.startswith(f"difftool {difftool.__version__}") and "backends:" in text and "tensorrt" in text
    dialog.close()


def test_the_backend_panel_shows_the_chosen_backends_declared_options(window, qapp) -> None:
    window.task_box.setCurrentText("superres")
    window.backend_box.setCurrentText("onnx")
    form = window.task_panel.options_form
    assert form is not None and set(form.widgets) == {"provider", "threads", "export"}
    form.widgets["threads"].setValue(2)
    assert window.build_job().options["backend_options"]["threads"] == 2
    window.backend_box.setCurrentText("torch")  # its own options: the low-memory mode (SD 3.5 / Flux)
    assert set(window.task_panel.options_form.widgets) == {"offload"}
    window.task_box.setCurrentText("dial")  # loads no model: no backend to choose, none passed
    assert not window.backend_box.isVisibleTo(window) and "backend" not in window.build_job().options


def test_run_button_with_tensorrt_on_cuda_reaches_the_engine(qapp, tmp_path: Path, photo: Path, superres_model: Path,
                                                             monkeypatch) -> None:  # fmt: skip
    """The GPU path from the window, with stand-ins for CUDA and tensorrt only (difftool.testing.gpu)."""
    from difftool.app import api
    from difftool.testing.gpu import gpu_harness
    from difftool.training.evaluate import psnr

    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    with gpu_harness() as harness:
        win = MainWindow(registry=build_registry(entry_points=False), settings=settings)
        win.model_box.insertItem(1, "tiny", str(superres_model))
        win.task_box.setCurrentText("superres")
        win.open_path(photo)
        win.model_box.setCurrentIndex(1)
        win.form.widgets["scale"].setCurrentText("2")
        win.seed_box.setValue(3)
        win.device_box.setCurrentText("cuda:0")
        win.backend_box.setCurrentText("tensorrt")
        assert win.backend_box.currentText() == "tensorrt"
        job_id = win.run_current()
        wait_for(win.queue, qapp)
        job = win.queue.jobs[job_id]
        win.close()
    assert job.state == "done", job.error
    assert job.result.record["backend"] == "tensorrt" and harness.trt.builds == 1 and harness.trt.executions > 0
    onnx = api.run("superres", photo, model=str(superres_model), scale=2, seed=3, backend="onnx", dtype="fp16")
    a, b = (np.asarray(r.image, np.float32) / 255 for r in (onnx, job.result))
    assert psnr(a, b) > 40


def test_reusing_an_inpaint_brings_the_painted_mask_back_not_its_placeholder(window, qapp, inpaint_model: Path,
                                                                              tmp_path: Path) -> None:  # fmt: skip
    """Issue 20, defect 1: reuse put the record's text "<image>" in the mask field and the rerun failed."""
    window.model_box.insertItem(1, "tiny-inpaint", str(inpaint_model))
    window.task_box.setCurrentText("inpaint")
    window.model_box.setCurrentIndex(1)
    source = Image.fromarray(np.random.default_rng(2).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    window.set_source(source)
    window.hardness.setValue(100)
    window.canvas.mask.brush_size = 6  # in image pixels: the stroke below is in image coordinates
    window.canvas.mask.checkpoint()
    window.canvas.mask.stroke(QPointF(10, 10), QPointF(20, 10))
    painted = window.painted_mask()
    window.seed_box.setValue(4)
    first = window.run_current()
    wait_for(window.queue, qapp)
    assert window.queue.jobs[first].state == "done", window.queue.jobs[first].error
    assert window.queue.jobs[first].result.record["mask"] == "<image>"

    window.canvas.mask.clear()  # the user goes on painting something else, then reuses the first run
    window.reuse_selected()
    assert window.form.widgets["mask"].text() == ""  # never the literal "<image>"
    assert np.array_equal(np.asarray(window.painted_mask()), np.asarray(painted))
    again = window.run_current()
    wait_for(window.queue, qapp)
    rerun = window.queue.jobs[again]
    assert rerun.state == "done", rerun.error
    assert np.array_equal(np.asarray(rerun.result.image), np.asarray(window.queue.jobs[first].result.image))

    saved = window.save_result(tmp_path / "inpainted.png")  # from the saved PNG: left empty, with a note
    window.form.widgets["mask"].edit.setText("stale.png")
    window.reuse_file(saved)
    assert window.form.widgets["mask"].text() == "" and "mask" in window.statusBar().currentMessage()


def test_ticking_paint_mask_keeps_the_view_so_strokes_land_where_aimed(window, qapp) -> None:
    """Issue 20, defect 2: the 160x120 source replaced its 320x240 result at the result's zoom, pinned
    top-left, so a stroke landed elsewhere. Now the source takes the result's place on screen."""
    from PySide6.QtGui import QImage

    window.resize(1000, 700)
    window.show()
    window.set_source(Image.new("RGB", (160, 120), (10, 20, 30)))
    window.canvas.set_result(QImage(320, 240, QImage.Format.Format_RGB32))
    window.canvas.fitted = False
    window.canvas.scale, window.canvas.offset = 2.23, QPointF(-40, -25)  # the user zoomed into the result
    screen = QPointF(300, 200)
    aimed = window.canvas.to_image(screen)  # the result pixel under the pointer
    window.paint_check.setChecked(True)
    assert window.canvas.after is None and window.canvas.scale == pytest.approx(4.46)
    source_point = window.canvas.to_image(screen)
    assert source_point.x() == pytest.approx(aimed.x() / 2) and source_point.y() == pytest.approx(aimed.y() / 2)
    window.close()


def test_the_form_gets_the_room_and_never_scrolls_sideways(window, qapp) -> None:
    """Issue 20, defect 6: at 1024x700 the form shrank to two rows; at 1280x800 inpaint scrolled sideways."""
    from PySide6.QtWidgets import QPushButton

    area = window.task_panel.form_area
    for size, task in (((1024, 700), "superres"), ((1280, 800), "inpaint"), ((1024, 700), "inpaint")):
        window.resize(*size)
        window.show()
        window.task_box.setCurrentText(task)
        for _ in range(20):
            qapp.processEvents()
        assert area.horizontalScrollBar().maximum() == 0, (size, task)
        assert area.viewport().height() >= 150, (size, task, area.viewport().height())  # five rows or more
        for button in window.form.findChildren(QPushButton):  # "Browse…" keeps its whole text
            assert button.width() >= button.sizeHint().width(), (size, task)
