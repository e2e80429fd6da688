"""Issue 34, "go past the anchors": A/B across any two results, and each task's recent prompts."""

from gui_helpers import wait_for
from PIL import Image
from PySide6.QtGui import QColor

from difftool.gui.prompt_tools import RECENT_PROMPTS, prompt_menu, recent_prompts


def _run_dial(window, qapp, color) -> None:
    window.set_source(Image.new("RGB", (16, 16), color))
    window.run_current()
    wait_for(window.queue, qapp)


def _pixel(image, x_frac: float) -> QColor:
    return image.pixelColor(int(image.width() * x_frac), image.height() // 2)


def test_two_results_compare_side_by_side_with_the_divider_and_back(window, qapp) -> None:
    window.resize(800, 600)
    window.show()
    window.task_box.setCurrentText("dial")
    window.form.widgets["count"].setValue(1)
    _run_dial(window, qapp, (250, 0, 0))  # result #1: red
    _run_dial(window, qapp, (0, 0, 250))  # result #2: blue
    strip, canvas = window.history_list, window.canvas
    first, second = strip.jobs

    menu = strip.compare_menu(strip.item(0))
    assert [a.text() for a in menu.actions()] == ["Compare results against #1 (A/B)"]
    strip.setCurrentRow(0)
    window.pin_for_compare()  # View > Compare results against this one (B), on #1
    assert strip.reference is first and canvas.compare
    strip.setCurrentRow(1)  # #2 is shown, set against #1
    for _ in range(5):
        qapp.processEvents()
    seeds = first.result.record["seed"], second.result.record["seed"]
    assert canvas.compare_labels == (f"#1 seed {seeds[0]}", f"#2 seed {seeds[1]}")
    canvas.set_split(0.5)
    grab = canvas.grab().toImage()
    target = canvas._image_rect(canvas.after)
    left = grab.pixelColor(int(target.left() + target.width() * 0.25), int(target.center().y()))
    right = grab.pixelColor(int(target.left() + target.width() * 0.75), int(target.center().y()))
    assert left.red() > 200 and left.blue() < 50  # A: #1, red, left of the divider
    assert right.blue() > 200 and right.red() < 50  # B: #2, blue, right of it
    assert [a.text() for a in strip.compare_menu(None).actions()] == ["Stop comparing against #1"]

    strip.compare_with.emit(None)  # the menu's "Stop comparing"
    assert strip.reference is None and canvas.compare_labels == ("before", "after")
    assert _pixel(canvas.compare_with, 0.5).blue() > 200  # #2 against its own input again (blue)


def test_each_task_keeps_its_recent_prompts_in_the_prompt_boxs_menu(window, qapp) -> None:
    window.task_box.setCurrentText("generate")
    prompt = window.form.widgets["prompt"]
    for text in ("a red barn", "a castle at dusk", "a red barn"):  # the repeat moves to the top, once
        prompt.setPlainText(text)
        window.build_job()  # what Run does before it queues the job
    assert recent_prompts(window.settings, "generate") == ["a red barn", "a castle at dusk"]
    assert recent_prompts(window.settings, "inpaint") == []  # per task

    menu = prompt_menu(prompt, window.settings, "generate", "prompt")
    recent = next(a.menu() for a in menu.actions() if a.text() == "Recent prompts")
    assert [a.text() for a in recent.actions()] == ["a red barn", "a castle at dusk"]
    recent.actions()[1].trigger()
    assert prompt.toPlainText() == "a castle at dusk"

    for i in range(RECENT_PROMPTS + 5):
        prompt.setPlainText(f"prompt {i}")
        window.build_job()
    kept = recent_prompts(window.settings, "generate")
    assert len(kept) == RECENT_PROMPTS and kept[0] == f"prompt {RECENT_PROMPTS + 4}"
    window.settings.setValue("prompts/generate/prompt", "{not json")  # a settings file edited by hand
    assert recent_prompts(window.settings, "generate") == []
