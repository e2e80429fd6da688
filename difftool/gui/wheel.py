"""The scroll wheel scrolls the form; it changes a value only in the field the user clicked or tabbed into.

Qt's spin and combo boxes take the wheel whenever the pointer passes over them (``Qt.WheelFocus``):
scrolling down a long form to read it turned guidance 7.0 into 6.9 and the task box to another task, and
those values were run and saved. The standard fix, for every such box in the app (forms are built on the
fly: :func:`guard` is called on each form, unit and panel as it is built): ``Qt.StrongFocus`` (the wheel
never gives them focus), and a wheel over one without focus scrolls the nearest scroll area instead.
"""

from __future__ import annotations

from PySide6.QtCore import QEvent, QObject, Qt
from PySide6.QtGui import QWheelEvent
from PySide6.QtWidgets import QAbstractScrollArea, QAbstractSpinBox, QApplication, QComboBox, QWidget

GUARDED = (QAbstractSpinBox, QComboBox)


class WheelGuard(QObject):
    """The event filter on each guarded box: see the module's docstring."""

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.Wheel and not has_focus(watched):  # type: ignore[arg-type]
            scroll(watched, event)  # type: ignore[arg-type]
            event.accept()
            return True
        return False


def has_focus(widget: QWidget) -> bool:
    focus = QApplication.focusWidget()
    return focus is not None and (focus is widget or widget.isAncestorOf(focus))


def scroll(widget: QWidget, event: QWheelEvent) -> None:
    """Hand ``event`` to the scroll area ``widget`` sits in (the form's), as if the pointer were over its page."""
    area = widget.parentWidget()
    while area is not None and not isinstance(area, QAbstractScrollArea):
        area = area.parentWidget()
    if area is None:
        return
    viewport = area.viewport()
    at = viewport.mapFromGlobal(event.globalPosition().toPoint())
    forwarded = QWheelEvent(
        at.toPointF(),
        event.globalPosition(),
        event.pixelDelta(),
        event.angleDelta(),
        event.buttons(),
        event.modifiers(),
        event.phase(),
        event.inverted(),
    )
    QApplication.sendEvent(viewport, forwarded)


_GUARD: list[WheelGuard] = []


def guard(root: QWidget) -> None:
    """Guard every spin and combo box in ``root`` (and ``root`` itself): call it when a form, a ControlNet
    unit or a panel is built. A filter on each box, not on the application: an application-wide Python
    filter sees every event of every object, some of them half destroyed."""
    if not _GUARD:
        _GUARD.append(WheelGuard())  # one filter object for all, alive as long as the process
    boxes = [root] if isinstance(root, GUARDED) else []
    boxes += root.findChildren(QAbstractSpinBox) + root.findChildren(QComboBox)
    for box in boxes:
        if box.focusPolicy() != Qt.FocusPolicy.StrongFocus or not box.property("wheel-guarded"):
            box.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
            box.setProperty("wheel-guarded", True)
            box.installEventFilter(_GUARD[0])
