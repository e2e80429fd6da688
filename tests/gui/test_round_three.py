"""Issue 34, the desktop app's third round: numbers an artist can trust, a window that keeps out of the way.

Each test drives the window offscreen and asserts what the artist would see or get (widget values,
pixels of reruns, focus), one numbered item of the issue at a time.
"""

from pathlib import Path

import numpy as np
import pytest
from gui_helpers import wait_for
from PIL import Image
from PySide6.QtCore import QPointF, QTimer
from PySide6.QtWidgets import QApplication, QMessageBox

from difftool.core.images import save_image
from difftool.gui import dialogs


def shown(window, qapp, size=(1280, 800)) -> None:
    window.resize(*size)
    window.show()
    for _ in range(10):
        qapp.processEvents()


# --- 1. opening someone else's image never trusts its record ---------------------------------------------


@pytest.fixture
def foreign_png(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A PNG whose difftool record asks for pickles and names files: two exist here, three do not."""
    files = {"vae": tmp_path / "vae.safetensors", "lora": tmp_path / "ink.safetensors"}
    for path in files.values():
        path.write_bytes(b"")
    record = {
        "task": "generate",
        "prompt": "a castle",
        "steps": 9,
        "seed": 4242,
        "allow_pickle": True,
        "vae": str(files["vae"]),
        "lora": f"{files['lora']}:0.6,{tmp_path / 'gone.safetensors'}:1",
        "embedding": str(tmp_path / "nowhere" / "evil.pt"),
        "control": [f"{tmp_path / 'cn.safetensors'}={tmp_path / 'edges.png'},pre=none"],
    }
    return save_image(Image.new("RGB", (8, 8), (9, 9, 9)), tmp_path / "foreign.png", record), files


def test_opening_an_image_sets_the_input_and_nothing_else(window, qapp, foreign_png) -> None:
    path, _ = foreign_png
    window.task_box.setCurrentText("superres")
    window.open_path(path)
    assert window.source is not None and window.source.size == (8, 8)
    assert window.task_box.currentText() == "superres" and window.seed_box.value() == -1  # not its task, not its seed
    assert "Reuse parameters from an image file" in window.statusBar().currentMessage()
    window.task_box.setCurrentText("generate")
    values = window.form.values()
    assert values["allow_pickle"] is False and "vae" not in values and "lora" not in values
    assert values.get("prompt", "") == "" and values["steps"] == 25


def test_reusing_a_file_never_takes_allow_pickle_and_offers_only_the_files_that_exist(
    window, qapp, foreign_png, monkeypatch
) -> None:
    path, files = foreign_png
    asked: list[tuple[dict, dict]] = []
    answer = {"value": False}

    def ask(parent, name, found, missing):
        asked.append((found, missing))
        return answer["value"]

    monkeypatch.setattr(dialogs, "ask_reuse_files", ask)
    assert window.reuse_file(path)  # "Leave them empty"
    found, missing = asked[0]
    assert found == {"vae": [str(files["vae"])], "lora": [str(files["lora"])]}  # only what exists, shown first
    assert set(missing) == {"lora", "embedding", "control"}
    values = window.form.values()
    assert window.task_box.currentText() == "generate" and values["prompt"] == "a castle" and values["steps"] == 9
    assert values["allow_pickle"] is False and "vae" not in values and "lora" not in values
    assert "control" not in values and "embedding" not in values and window.seed_box.value() == 4242
    assert '"allow pickle" is never taken' in window.statusBar().currentMessage()

    answer["value"] = True  # "Fill these files too": the existing ones, never the missing ones nor the pickles
    assert window.reuse_file(path)
    values = window.form.values()
    assert values["vae"] == str(files["vae"]) and values["lora"] == f"{files['lora']}:0.6"
    assert values["allow_pickle"] is False and "control" not in values and "embedding" not in values

    window.form.widgets["steps"].setValue(3)
    answer["value"] = None  # Cancel: nothing changes
    assert not window.reuse_file(path)
    assert window.form.values()["steps"] == 3


def test_the_reuse_dialog_lists_the_files_and_defaults_to_leaving_them_out(window, qapp, foreign_png) -> None:
    path, files = foreign_png
    seen: list[str] = []

    def answer() -> None:
        box = QApplication.activeModalWidget()
        assert isinstance(box, QMessageBox)
        seen.append(box.informativeText())
        box.defaultButton().click()

    QTimer.singleShot(50, answer)
    assert window.reuse_file(path)
    assert str(files["vae"]) in seen[0] and "gone.safetensors" in seen[0] and "allow pickle" in seen[0]
    assert "vae" not in window.form.values()  # the default button leaves the files out


# --- 2. the scroll wheel scrolls the form; it changes only the focused field ------------------------------


def wheel(widget, qapp, notches: int = -1) -> None:
    from PySide6.QtCore import QPoint, QPointF, Qt
    from PySide6.QtGui import QWheelEvent

    centre = QPointF(widget.width() / 2, widget.height() / 2)
    event = QWheelEvent(
        centre,
        QPointF(widget.mapToGlobal(centre.toPoint())),
        QPoint(0, 0),
        QPoint(0, 120 * notches),
        Qt.MouseButton.NoButton,
        Qt.KeyboardModifier.NoModifier,
        Qt.ScrollPhase.NoScrollPhase,
        False,
    )
    QApplication.sendEvent(widget, event)
    qapp.processEvents()


def test_the_wheel_over_the_form_scrolls_it_and_changes_no_value(window, qapp) -> None:
    from PySide6.QtCore import Qt

    shown(window, qapp, (1000, 600))
    window.task_box.setCurrentText("generate")
    window.form.widgets["control"].add()  # its weight box too
    for _ in range(10):
        qapp.processEvents()
    guidance = window.form.widgets["guidance_scale"]
    weight = window.form.widgets["control"].boxes[0].weight
    bar = window.task_panel.form_area.verticalScrollBar()
    assert bar.maximum() > 0  # a form taller than its area
    before = (guidance.value(), weight.value(), window.task_box.currentText(), window.form.values())
    for box in (guidance, weight, window.task_box, window.form.widgets["scheduler"]):
        assert box.focusPolicy() == Qt.FocusPolicy.StrongFocus  # the wheel never gives them focus
    window.activateWindow()
    window.run_button.setFocus()  # the artist's focus is elsewhere (it had been on the task box)
    qapp.processEvents()
    scrolled = bar.value()
    wheel(guidance, qapp)
    assert bar.value() > scrolled  # the page moved down instead
    wheel(weight, qapp)
    wheel(window.task_box, qapp)
    assert (guidance.value(), weight.value(), window.task_box.currentText(), window.form.values()) == before

    guidance.setFocus()
    qapp.processEvents()
    assert guidance.hasFocus()
    wheel(guidance, qapp, notches=1)  # clicked into: the wheel is the field's
    assert guidance.value() == pytest.approx(before[0] + guidance.singleStep())


# --- 3. reuse parameters reproduces the image, for each task ----------------------------------------------


@pytest.fixture(scope="module")
def sd_checkpoint(tmp_path_factory) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "builtin"))
    from sd import tiny

    return tiny.save_single_file(tiny.components(seed=1), tmp_path_factory.mktemp("sd") / "tiny-sd.safetensors")


def _texture(size=(16, 16)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _setup(window, task: str, first: bool) -> None:
    """The form of the first run (``first``), or of a later run that changes what the first did not set."""
    set_ = window.form.set_values
    if task == "superres":
        set_({"scale": "2" if first else "4", "steps": 2 if first else 3})
    elif task == "inpaint":
        set_({"steps": 2} if first else {"steps": 3, "feather": 9, "dilate": 5})
    elif task == "generate":
        set_({"prompt": "a boat", "width": 16, "height": 16, "steps": 2})
        if not first:  # hires set by a later run, not recorded by the first: the rerun must not keep it
            set_({"hires": 2.0, "hires_steps": 2, "guidance_scale": 3.0})
    elif task == "style":
        set_({"prompt": "a boat", "steps": 2, "strength": 0.5} if first else {"steps": 3, "strength": 0.9})
    elif task == "upscale-sd":
        set_({"prompt": "a boat", "steps": 4, "strength": 0.5, "scale": 2.0} if first else {"scale": 1.5})


@pytest.mark.parametrize("task", ["superres", "inpaint", "generate", "style", "upscale-sd"])
def test_reuse_reproduces_the_image_for_each_task(window, qapp, task, inpaint_model, sd_checkpoint) -> None:
    window.model_box.insertItem(1, "tiny-inpaint", str(inpaint_model))
    window.model_box.insertItem(1, "tiny-sd", str(sd_checkpoint))
    window.task_box.setCurrentText(task)
    model = {"superres": "tiny", "inpaint": "tiny-inpaint"}.get(task, "tiny-sd")
    window.model_box.setCurrentIndex(window.model_box.findText(model))
    window.set_source(_texture())
    if task == "inpaint":
        window.hardness.setValue(100)
        window.canvas.mask.brush_size = 6
        window.canvas.mask.checkpoint()
        window.canvas.mask.stroke(QPointF(4, 4), QPointF(12, 8))
    window.dtype_box.setCurrentText("fp32")
    _setup(window, task, first=True)
    assert window.seed_box.value() == -1  # a random seed: only the record knows it
    first = window.queue.jobs[window.run_current()]
    wait_for(window.queue, qapp)
    assert first.state == "done", first.error
    _setup(window, task, first=False)
    later = window.queue.jobs[window.run_current()]
    wait_for(window.queue, qapp)
    assert later.state == "done", later.error
    window.dtype_box.setCurrentText("bf16")  # then the artist picked other settings, without running them
    window.backend_box.setCurrentText("onnx")

    window.history_list.setCurrentRow(0)
    window.reuse_selected()
    assert window.backend_box.currentText() == "torch" and window.dtype_box.currentText() == "fp32"
    assert window.seed_box.value() == first.result.record["seed"]
    again = window.queue.jobs[window.run_current()]
    wait_for(window.queue, qapp)
    assert again.state == "done", again.error
    assert again.result.image.size == first.result.image.size
    assert np.array_equal(np.asarray(again.result.image), np.asarray(first.result.image))


# --- 4. only Reuse sets the seed, and the seed field shows when it is fixed -------------------------------


def test_opening_a_file_leaves_the_seed_random_and_a_fixed_seed_shows(window, qapp, tmp_path: Path) -> None:
    made = save_image(Image.new("RGB", (8, 8)), tmp_path / "made.png", {"task": "dial", "count": 2, "seed": 77})
    window.task_box.setCurrentText("dial")
    window.open_path(made)
    seeds = []
    for _ in range(2):
        seeds.append(window.queue.jobs[window.run_current()])
        wait_for(window.queue, qapp)
    window.task_box.setCurrentText("superres")
    window.task_box.setCurrentText("dial")
    seeds.append(window.queue.jobs[window.run_current()])
    wait_for(window.queue, qapp)
    recorded = [job.result.record["seed"] for job in seeds]
    assert 77 not in recorded and len(set(recorded)) == 3  # a new seed for each job, whatever was opened
    assert window.seed_box.text() == "random" and not window.task_panel.seed_random.isEnabled()

    window.reuse_file(made)  # Reuse sets it, and the field says it is fixed
    assert window.seed_box.value() == 77 and window.seed_box.text() == "fixed: 77"
    assert window.task_panel.seed_random.isEnabled()
    window.task_panel.seed_random.click()
    assert window.seed_box.value() == -1 and window.seed_box.text() == "random"


# --- 5. the ControlNet box: no unit dropped in silence, the empty image is what it says, GUI words ----------


def test_a_controlnet_unit_without_a_model_is_refused_naming_its_model_field_only(window, qapp, photo) -> None:
    shown(window, qapp)
    window.activateWindow()
    window.task_box.setCurrentText("generate")
    window.model_box.insertItem(1, "tiny-sd", str(photo))  # never loaded: Run refuses before queueing
    window.model_box.setCurrentIndex(1)
    window.form.widgets["prompt"].setPlainText("a boat")
    box = window.form.widgets["control"].add()
    assert window.run_current() is None and not window.queue.jobs  # refused, not run without its unit
    error = window.last_error
    assert error.startswith("ControlNet 1 has no model") and '"model"' in error and "--" not in error
    assert "border" in box.model.styleSheet()
    others = [box.image.edit, box.pre, box.weight, box.options, box, window.form.widgets["control"]]
    assert all(w.styleSheet() == "" for w in others)  # only the field to fix is outlined
    assert box.model.isAncestorOf(QApplication.focusWidget()) or QApplication.focusWidget() is box.model
    box.model.setCurrentText("cn")  # fixed: the outline goes
    assert box.model.styleSheet() == ""


def test_an_empty_control_image_is_the_open_image_for_generate_in_the_run_and_the_preview(window, qapp, photo) -> None:
    window.task_box.setCurrentText("generate")
    window.open_path(photo)
    window.form.widgets["prompt"].setPlainText("a boat")
    box = window.form.widgets["control"].add()
    box.model.setCurrentText("cn")
    assert box.image.edit.placeholderText() == "empty: the open image"
    assert window.build_job().params["control"] == [f"cn={photo},pre=none,weight=1,start=0,end=1"]
    box.show_preview()
    assert box.preview_array is not None and box.preview_array.shape == (20, 28, 3)

    window.set_source(Image.new("RGB", (16, 16)))  # pasted: no file to name; refused, the image field outlined
    assert window.run_current() is None
    assert "ControlNet 1 has no control image" in window.last_error and '"image"' in window.last_error
    assert "border" in box.image.edit.styleSheet() and box.model.styleSheet() == ""
    box.show_preview()  # the preview says the same, instead of previewing what the run cannot use
    assert box.preview_array is None and "not a file" in box.preview_label.text()
    window.task_box.setCurrentText("style")  # a task with an input image: empty means that image
    assert window.form.widgets["control"].add().image.edit.placeholderText() == "empty: the input image"


def test_control_errors_from_a_run_are_in_the_windows_words() -> None:
    from difftool.gui.messages import for_the_window

    text, fields = for_the_window("ControlNet cn has no control image; write --control cn=IMAGE", ["control", "prompt"])
    assert "--" not in text and "write" not in text and fields == ["control"]
    assert (
        text == "ControlNet cn has no control image; fill in the ControlNet unit's fields (model, image, preprocessor)"
    )


# --- 6. errors, descriptions and tooltips in the window's words; outlines go once fixed ------------------


def test_descriptions_and_tooltips_name_fields_not_flags(window, qapp) -> None:
    for index in range(window.task_box.count()):
        window.task_box.setCurrentIndex(index)
        window.model_box.setCurrentIndex(0)
        window.task_panel._show_availability()
        status = window.task_panel.task_status.text()
        tip = window.task_box.itemData(index, 3)  # the tooltip role
        assert "--" not in status and "--" not in tip, (window.task_box.currentText(), status, tip)
    window.task_box.setCurrentText("superres")
    assert '"model"' in window.task_box.itemData(window.task_box.currentIndex(), 3)  # (a .pth file in "model")
    window.task_box.setCurrentText("generate")
    assert 'choose a model in "model"' in window.task_panel.task_status.text()
    backends = window.backend_box
    tips = [backends.itemData(i, 3) for i in range(backends.count())]
    assert not any("--" in tip for tip in tips), tips
    assert any('"device"' in tip for tip in tips)  # TensorRT: set "device" to cuda


def test_a_crash_points_at_details_not_at_a_flag(qapp, tmp_path: Path) -> None:
    from gui_helpers import DialPlugin
    from PySide6.QtCore import QSettings

    from difftool.core.task import Task
    from difftool.gui.app import MainWindow
    from difftool.plugins import hookimpl
    from difftool.plugins.registry import build_registry

    class Crash(Task):
        name = "crash"
        summary = "A plugin task with a bug"

        def run(self, request, context):
            raise ZeroDivisionError("division by zero")

    class CrashPlugin:
        @hookimpl
        def register_tasks(self, register):
            register(Crash)

    registry = build_registry([CrashPlugin(), DialPlugin()], entry_points=False)
    win = MainWindow(registry=registry, settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    win.task_box.setCurrentText("crash")
    win.set_source(Image.new("RGB", (4, 4)))
    job = win.queue.jobs[win.run_current()]
    wait_for(win.queue, qapp)
    assert job.state == "failed" and "ZeroDivisionError" in win.last_error
    assert "--" not in win.last_error and "Details" in win.last_error and "--" not in win.status.job.text()
    win.close()


def test_the_hires_error_comes_before_the_first_pass_and_outlines_the_hires_fields(window, qapp, sd_checkpoint) -> None:
    window.model_box.insertItem(1, "tiny-sd", str(sd_checkpoint))
    window.task_box.setCurrentText("generate")
    window.model_box.setCurrentIndex(1)
    window.form.set_values({"prompt": "a boat", "width": 16, "height": 16, "steps": 4})
    window.form.set_values({"hires": 2.0, "hires_strength": 0.1})
    steps: list[int] = []
    window.queue.signals.progress.connect(lambda job_id, step, total, preview: steps.append(step))
    job = window.queue.jobs[window.run_current()]
    wait_for(window.queue, qapp)
    assert job.state == "failed" and steps == []  # no base pass ran first
    error = window.last_error
    assert "--" not in error and '"hires strength"' in error and '"hires steps"' in error, error
    strength, hires_steps, base_steps = (window.form.widgets[k] for k in ("hires_strength", "hires_steps", "steps"))
    assert "border" in strength.styleSheet() and "border" in hires_steps.styleSheet()
    assert base_steps.styleSheet() == ""
    strength.setValue(0.5)  # fixed: its outline goes at once
    assert strength.styleSheet() == ""
    window.form.set_values({"hires_steps": 2})
    job = window.queue.jobs[window.run_current()]
    wait_for(window.queue, qapp)
    assert job.state == "done", job.error
    assert hires_steps.styleSheet() == ""  # a successful run of the task clears what is left


# --- 8. keyboard: Tab leaves the prompt, Ctrl+Tab types one, Ctrl+Enter runs, Tab follows the layout --------


def test_the_keyboard_moves_through_the_panel_as_it_is_laid_out(window, qapp) -> None:
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    shown(window, qapp)
    window.activateWindow()
    window.task_box.setCurrentText("generate")
    window.form.widgets["control"].add()
    prompt = window.form.widgets["prompt"]
    prompt.setFocus()
    qapp.processEvents()
    QTest.keyClicks(prompt, "a boat")
    QTest.keyClick(prompt, Qt.Key.Key_Tab)
    assert prompt.toPlainText() == "a boat" and QApplication.focusWidget() is window.form.widgets["negative_prompt"]
    QTest.keyClick(prompt, Qt.Key.Key_Tab, Qt.KeyboardModifier.ControlModifier)
    assert prompt.toPlainText() == "a boat\t"  # Ctrl+Tab types a tab

    window.task_box.setFocus()  # Tab from the task box down the panel, field by field
    qapp.processEvents()
    visited = [window.task_box]
    for _ in range(200):
        QTest.keyClick(QApplication.focusWidget(), Qt.Key.Key_Tab)
        widget = QApplication.focusWidget()
        if widget is window.run_button or widget in visited:
            break
        visited.append(widget)
    assert QApplication.focusWidget() is window.run_button
    unit = window.form.widgets["control"].boxes[0]

    def place(widget) -> int:
        return next(i for i, w in enumerate(visited) if w is widget or widget.isAncestorOf(w))

    order = [
        window.task_box,
        prompt,
        window.form.widgets["steps"],
        unit.model,
        unit.weight,
        window.form.widgets["allow_pickle"],
        window.model_box,
        window.dtype_box,
        window.seed_box,
    ]
    places = [place(w) for w in order]
    assert places == sorted(places), places

    QTest.keyClick(window.canvas, Qt.Key.Key_T, Qt.KeyboardModifier.AltModifier)  # Alt+T: the task box
    assert QApplication.focusWidget() is window.task_box


def test_ctrl_enter_runs_from_the_prompt_box(window, qapp) -> None:
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    shown(window, qapp)
    window.activateWindow()
    window.task_box.setCurrentText("dial")
    window.set_source(Image.new("RGB", (8, 8)))
    field = window.form.widgets["strength"]
    field.setFocus()
    qapp.processEvents()
    QTest.keyClick(field, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    wait_for(window.queue, qapp)
    assert [job.state for job in window.queue.jobs.values()] == ["done"]
    window.task_box.setCurrentText("generate")
    prompt = window.form.widgets["prompt"]
    prompt.setFocus()
    qapp.processEvents()
    QTest.keyClick(prompt, Qt.Key.Key_Enter, Qt.KeyboardModifier.ControlModifier)  # the keypad's Enter too
    assert len(window.queue.jobs) == 2 or "model" in window.last_error  # generate without a model: refused
    assert "\n" not in prompt.toPlainText()


# --- 9. cancel says so at once, and the row says how the job ended ----------------------------------------


def test_cancel_shows_cancelling_at_once_then_cancelled_on_the_jobs_row(window, qapp) -> None:
    import time

    window.task_box.setCurrentText("dial")
    window.set_source(Image.new("RGB", (8, 8)))
    window.form.widgets["count"].setValue(9)
    job = window.queue.jobs[window.run_current()]
    deadline = time.monotonic() + 10
    while "step" not in window.queue_list.item(0).text() and time.monotonic() < deadline:
        qapp.processEvents()  # the job is running its steps
    window.cancel_button.click()
    row = window.queue_list.item(0)
    assert row.text() == f"#{job.id} dial — cancelling…"  # before the job reaches its next step
    assert window.status.job.text() == f"#{job.id} dial: cancelling…" and not window.cancel_button.isEnabled()
    wait_for(window.queue, qapp)
    assert job.state == "cancelled"
    rows = [window.queue_list.item(i).text() for i in range(window.queue_list.count())]
    assert rows == [f"#{job.id} dial — cancelled"] and window.status.job.text() == f"#{job.id} dial: cancelled"


# --- 10. connecting to a server (or back) keeps the task and the seed ---------------------------------------


def test_switching_where_jobs_run_keeps_the_task_its_values_and_the_seed(window, qapp) -> None:
    from gui_helpers import DialPlugin

    from difftool.plugins.registry import build_registry

    window.task_box.setCurrentText("superres")
    window.form.widgets["tile"].setValue(512)
    window.seed_box.setValue(1234)
    server_side = build_registry([DialPlugin()], entry_points=False)  # what a server's registry offers
    window.use_registry(server_side, "http://gpu-box:7860")
    assert window.task_box.currentText() == "superres" and window.seed_box.value() == 1234
    assert window.form.values()["tile"] == 512
    window.use_registry(None)  # File > Disconnect
    assert window.task_box.currentText() == "superres" and window.seed_box.value() == 1234
    assert window.form.values()["tile"] == 512


# --- 11. what the window shows is current and in plain words -----------------------------------------------


def test_the_history_strip_is_one_row_with_its_own_captions_and_the_newest_in_view(window, qapp) -> None:
    shown(window, qapp, (1000, 700))
    window.task_box.setCurrentText("dial")
    window.form.widgets["count"].setValue(1)
    for shade in range(12):  # more than the strip's width holds
        window.set_source(Image.new("RGB", (8, 8), (shade * 20, 0, 0)))
        window.run_current()
        wait_for(window.queue, qapp)
    strip = window.history_list
    for _ in range(10):
        qapp.processEvents()
    rects = [strip.visualItemRect(strip.item(i)) for i in range(strip.count())]
    assert len({rect.top() for rect in rects}) == 1  # one row: nothing wraps under the visible one
    assert [strip.item(i).text() for i in range(strip.count())] == [f"dial #{i}" for i in range(1, 13)]
    assert strip.viewport().rect().intersects(rects[-1])  # the newest result is in view


def test_the_zoom_in_the_status_bar_follows_every_zoom(window, qapp) -> None:
    shown(window, qapp)
    window.set_source(Image.new("RGB", (100, 50)))
    canvas = window.canvas
    assert window.status.zoom.text() == f"{canvas.scale * 100:.0f}%"
    window._on_hover(3, 3)
    canvas.actual_size()  # Ctrl+1, with the pointer still: not the zoom of the last mouse move
    assert window.status.zoom.text() == "100%"
    canvas.fit()
    assert window.status.zoom.text() == f"{canvas.scale * 100:.0f}%" != "100%"
    window.resize(900, 640)
    qapp.processEvents()
    assert window.status.zoom.text() == f"{canvas.scale * 100:.0f}%"


def test_tooltips_never_show_python_and_defaults_say_what_they_are(window, qapp) -> None:
    from difftool.gui.history import describe

    tip = describe(
        {"task": "generate", "seed": 1, "control": (), "backend_options": {"provider": "auto", "threads": 2},
         "lora": ["a.safetensors:0.6", "b.safetensors"]},
        "generate #1",
    )  # fmt: skip
    assert "()" not in tip and "{" not in tip and "'" not in tip and "[" not in tip, tip
    assert "backend options: provider auto, threads 2" in tip and "lora: a.safetensors:0.6; b.safetensors" in tip
    assert "control" not in tip  # nothing to say

    window.task_box.setCurrentText("generate")  # no default model exists: none is offered
    assert window.model_box.itemText(0) == "(choose a model)" and window.model_box.currentIndex() == 0
    window.task_box.setCurrentText("superres")
    assert window.model_box.itemText(0) == "(default)"  # the embedded model
    scale = window.form.widgets["scale"]
    assert (
        scale.currentText() == "(default: 4, or a community model's own scale)" and "scale" not in window.form.values()
    )
    assert window.form.widgets["steps"].specialValueText() == "(default: the model's)"
    window.task_box.setCurrentText("generate")
    upscaler = window.form.widgets["hires_upscaler"]
    assert "" not in [upscaler.itemText(i) for i in range(upscaler.count())]  # no blank first entry
    assert upscaler.itemText(0) == "latent" and "hires_upscaler" not in window.form.values()
    window.task_box.setCurrentText("inpaint")
    assert "optional" not in window.form.widgets["mask"].edit.placeholderText()  # inpaint needs a mask
    assert "paint" in window.form.widgets["mask"].edit.placeholderText()


# --- 7. laid out for 1280x800 first; nothing lost at 1000x700 -----------------------------------------------


def test_the_window_is_laid_out_for_1280x800_and_loses_nothing_at_1000x700(window, qapp, tmp_path: Path) -> None:
    from PySide6.QtCore import QSettings, Qt

    from difftool.gui.app import MainWindow

    shown(window, qapp, (1280, 800))
    window.set_source(Image.new("RGB", (400, 300)))
    window.task_box.setCurrentText("dial")
    window.run_current()
    wait_for(window.queue, qapp)
    window.task_box.setCurrentText("generate")
    unit = window.form.widgets["control"].add()
    for _ in range(20):
        qapp.processEvents()
    panel, prompt = window.task_panel, window.form.widgets["prompt"]
    assert panel.width() >= 360, panel.width()
    assert prompt.width() >= window.form.width() - 30  # the prompt box spans the panel, under its label
    assert prompt.height() >= prompt.fontMetrics().lineSpacing() * 4
    edit = unit.model.lineEdit()
    assert edit.fontMetrics().horizontalAdvance(edit.placeholderText()) <= edit.width()  # not "ControlNet: ..."
    row = window.queue_list.item(0)
    assert window.queue_list.fontMetrics().horizontalAdvance(row.text()) <= window.queue_list.viewport().width()

    for size in ((1000, 700), (1280, 800)):
        window.resize(*size)
        for _ in range(20):
            qapp.processEvents()
        area = panel.form_area
        assert area.horizontalScrollBar().maximum() == 0 and area.viewport().height() >= 150, size
        bottom = window.run_button.mapTo(window, window.run_button.rect().bottomRight())
        assert window.rect().contains(bottom) and window.run_button.isVisible(), size
        canvas = window.canvas  # the image refits: all of it on screen
        assert canvas.fitted and 400 * canvas.scale <= canvas.width() + 1 and 300 * canvas.scale <= canvas.height() + 1

    window.resizeDocks([window.task_dock], [460], Qt.Orientation.Horizontal)  # the artist widens the panel
    for _ in range(10):
        qapp.processEvents()
    width = window.task_dock.width()
    window.close()
    again = MainWindow(window.registry, QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    again.show()
    for _ in range(10):
        qapp.processEvents()
    assert abs(again.task_dock.width() - width) <= 4 and width > 400  # remembered across restarts
    again.close()


# --- 12. a dropped batch: its overall count, and saved in one go ------------------------------------------


def test_a_dropped_batch_counts_as_a_whole_and_saves_in_one_go(window, qapp, tmp_path: Path) -> None:
    from difftool.core.images import read_metadata

    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (12, 10), (i * 60, 10, 10)).save(folder / f"shot{i}.png")
    window.task_box.setCurrentText("dial")
    counts: list[str] = []
    window.queue.signals.finished.connect(lambda _: counts.append(window.status.batch.text()))
    window.run_batch([folder])
    assert window.status.batch.text() == "batch: 0 / 3 done"
    wait_for(window.queue, qapp)
    assert window.status.batch.text() == "batch: 3 / 3 done"
    assert "batch: 1 / 3 done" in counts and "batch: 2 / 3 done" in counts  # counted as each one ended

    window.set_source(Image.new("RGB", (8, 8)))  # a single run afterwards is not part of the batch
    window.run_current()
    wait_for(window.queue, qapp)
    window.history_list.setCurrentRow(1)  # any result of the batch
    out = tmp_path / "out"
    out.mkdir()
    (out / "shot0.dial.png").write_bytes(b"mine")
    saved, kept = window.save_batch(out)
    assert sorted(p.name for p in saved) == ["shot1.dial.png", "shot2.dial.png"]  # named as Save names them
    assert [p.name for p in kept] == ["shot0.dial.png"] and (out / "shot0.dial.png").read_bytes() == b"mine"
    assert read_metadata(out / "shot2.dial.png")["difftool"]["task"] == "dial"
    assert np.asarray(Image.open(out / "shot2.dial.png"))[0, 0, 0] == 120
    saved, kept = window.save_batch(out, replace=True)
    assert len(saved) == 3 and not kept and "saved 3 result(s)" in window.statusBar().currentMessage()
