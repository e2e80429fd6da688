"""Screenshots of the real desktop app for the README, taken under Xvfb.

    xvfb-run -a -s "-screen 0 1400x900x24" python docs/screenshots.py

Starts the app on an X server (not the offscreen platform), opens docs/sample.png, runs superres and
inpaint (with a painted mask) on the embedded models, and saves docs/images/gui-*.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PySide6.QtCore import QPointF
from PySide6.QtWidgets import QApplication

ROOT = Path(__file__).resolve().parents[1]


def settle(app: QApplication, window, rounds: int = 30) -> None:
    while not window.queue.wait(20):
        app.processEvents()
    for _ in range(rounds):
        app.processEvents()


def main() -> None:
    from difftool.gui.app import MainWindow

    app = QApplication(sys.argv)
    window = MainWindow()
    window.resize(1360, 860)
    window.show()
    window.open_path(ROOT / "docs" / "sample.png")
    window.task_box.setCurrentText("superres")
    window.seed_box.setValue(1)
    window.run_current()
    settle(app, window)
    window.split.setValue(50)
    settle(app, window)
    out = ROOT / "docs" / "images"
    out.mkdir(exist_ok=True)
    window.grab().save(str(out / "gui-superres.png"))

    window.split.setValue(100)
    window.task_box.setCurrentText("inpaint")
    window.open_path(ROOT / "docs" / "sample.png")
    window.paint_check.setChecked(True)
    window.brush_size.setValue(14)
    mask = window.canvas.mask
    mask.checkpoint()
    mask.stroke(QPointF(60, 40), QPointF(100, 70))
    settle(app, window)
    window.grab().save(str(out / "gui-inpaint-mask.png"))
    window.run_current()
    settle(app, window)
    window.grab().save(str(out / "gui-inpaint.png"))
    window.close()
    print("\n".join(str(p) for p in sorted(out.glob("gui-*.png"))))


if __name__ == "__main__":
    main()
