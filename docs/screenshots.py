"""Screenshots of the real desktop app for the README and docs/gui.md, at 1280x800 (the size the window
is laid out for first), taken under Xvfb:

    xvfb-run -a -s "-screen 0 1280x800x24" python docs/screenshots.py

(``QT_QPA_PLATFORM=offscreen python docs/screenshots.py`` takes the same pictures without an X server.)
Starts the app with its own settings file, opens docs/sample.png and saves docs/images/gui-*.png:

* gui-loading.png: the inpaint job while it loads its model (the phase in the status bar and its queue row);
* gui-superres.png: its result in the compare view, the divider halfway;
* gui-inpaint-mask.png: a mask painted with a screen-sized brush (its outline at the pointer);
* gui-inpaint.png: the inpaint result in the compare view;
* gui-controlnet.png: a ControlNet unit in the generate form, with its canny preview of the sample;
* gui-reference.png: the style form with two reference images dropped on its reference field (thumbnails),
  an IP-Adapter named and the style-only mode. The references are drawn here (nothing is downloaded);
  ``python docs/screenshots.py reference`` takes this one alone (it runs no model).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PySide6.QtCore import QPoint, QPointF, QSettings
from PySide6.QtGui import QCursor
from PySide6.QtWidgets import QApplication

ROOT = Path(__file__).resolve().parents[1]


def settle(app: QApplication, window, rounds: int = 30) -> None:
    while window.queue.running is not None or window.queue.pending or not window.queue.wait(20):
        app.processEvents()
    for _ in range(rounds):
        app.processEvents()


def paintings(folder: Path) -> list[Path]:
    """Two small "paintings" drawn here: the sample posterised under a blur, and a field of swirls."""
    import numpy as np
    from PIL import Image, ImageFilter, ImageOps

    poster = Image.open(ROOT / "docs" / "sample.png").convert("RGB").filter(ImageFilter.ModeFilter(5))
    poster = ImageOps.posterize(poster.resize((256, 192), Image.Resampling.LANCZOS), 2)
    y, x = np.mgrid[0:192, 0:256] / 24.0
    angle = np.sin(x) + np.cos(y * 1.3) + np.sin((x + y) / 3)
    palette = np.array([[22, 40, 110], [40, 90, 170], [240, 200, 60], [250, 240, 170], [30, 60, 50]], np.float32)
    bands = (np.sin(angle * 3) * 0.5 + 0.5) * (len(palette) - 1)
    low = np.floor(bands).astype(int)
    mix = (bands - low)[..., None]
    swirl = palette[low] * (1 - mix) + palette[np.minimum(low + 1, len(palette) - 1)] * mix
    folder.mkdir(parents=True, exist_ok=True)
    poster.save(folder / "poster.png")
    Image.fromarray(swirl.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1)).save(folder / "swirls.png")
    return [folder / "poster.png", folder / "swirls.png"]


def reference_shot(app: QApplication, window, out: Path) -> None:
    """The style form with two references dropped on its field (a real drop event, as a file manager sends)."""
    from PySide6.QtCore import QMimeData, Qt, QUrl
    from PySide6.QtGui import QDropEvent

    window.open_path(ROOT / "docs" / "sample.png")
    window.model_box.insertItem(1, "v1-5-pruned-emaonly")  # named as `difftool models` lists it; nothing runs
    window.model_box.setCurrentIndex(1)
    window.task_box.setCurrentText("style")
    form = window.form
    form.widgets["prompt"].setPlainText("a motorcycle in a garage")
    field = form.widgets["reference"]
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paintings(Path(tempfile.mkdtemp()) / "references")])
    drop = QDropEvent(
        QPointF(8, 8), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    )
    field.dragEnterEvent(drop)
    field.dropEvent(drop)
    form.set_values({"ip_adapter": "ip-adapter_sd15", "reference_weight": 0.8, "reference_mode": "style"})
    settle(app, window)
    area = window.task_panel.form_area
    area.verticalScrollBar().setValue(field.y() - 22)  # the field with its label at the top
    settle(app, window)
    window.grab().save(str(out / "gui-reference.png"))


def main() -> None:
    from difftool.gui.app import MainWindow

    app = QApplication(sys.argv)
    settings = QSettings(str(Path(tempfile.mkdtemp()) / "settings.ini"), QSettings.Format.IniFormat)
    window = MainWindow(settings=settings)
    window.resize(1280, 800)  # the size the window is laid out for
    window.show()
    out = ROOT / "docs" / "images"
    out.mkdir(exist_ok=True)
    if sys.argv[1:] == ["reference"]:  # this one alone: it runs no model
        reference_shot(app, window, out)
        window.close()
        return
    window.open_path(ROOT / "docs" / "sample.png")
    window.task_box.setCurrentText("superres")
    window.seed_box.setValue(1)

    def on_phase(job_id: int, what: str, *_: object) -> None:
        if what.startswith("loading model") and window.task_box.currentText() == "inpaint":
            app.processEvents()
            window.grab().save(str(out / "gui-loading.png"))  # the mask painted, the model loading

    window.queue.signals.phase.connect(on_phase)
    window.run_current()
    settle(app, window)
    window.compare_check.setChecked(True)
    window.canvas.set_split(0.5)
    settle(app, window)
    window.grab().save(str(out / "gui-superres.png"))

    window.task_box.setCurrentText("inpaint")
    window.open_path(ROOT / "docs" / "sample.png")
    window.paint_check.setChecked(True)
    window.brush_size.setValue(40)
    canvas = window.canvas
    mask = canvas.mask
    mask.brush_size = canvas.brush_in_image()
    mask.checkpoint()
    mask.stroke(QPointF(60, 40), QPointF(100, 70))
    pointer = canvas.offset + QPointF(100, 70) * canvas.scale
    canvas._pointer = QPointF(pointer)  # the brush outline where the stroke ended
    QCursor.setPos(canvas.mapToGlobal(QPoint(int(pointer.x()), int(pointer.y()))))
    settle(app, window)
    window.grab().save(str(out / "gui-inpaint-mask.png"))
    window.run_current()
    settle(app, window)
    window.paint_check.setChecked(False)
    window.canvas.set_split(0.5)
    settle(app, window)
    window.grab().save(str(out / "gui-inpaint.png"))

    window.compare_check.setChecked(False)
    window.task_box.setCurrentText("generate")
    window.form.widgets["prompt"].setPlainText("a red motorcycle in a studio, film photo")
    box = window.form.widgets["control"].add()  # no ControlNet is needed to preview its preprocessor
    box.model.setCurrentText("sd15-canny")
    box.pre.setCurrentText("canny")
    box.options.setText("low=80,high=160")
    box.end.setValue(0.8)
    box.show_preview()
    settle(app, window)
    window.task_panel.form_area.ensureWidgetVisible(box.preview_label, 0, 8)  # the unit's preview in view
    settle(app, window)
    window.grab().save(str(out / "gui-controlnet.png"))
    reference_shot(app, window, out)
    window.close()
    print("\n".join(str(p) for p in sorted(out.glob("gui-*.png"))))


if __name__ == "__main__":
    main()
