"""Keyboard focus: the widgets Tab stops at in a panel, in the order its layouts show them."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractButton,
    QAbstractItemView,
    QAbstractSpinBox,
    QComboBox,
    QLineEdit,
    QPlainTextEdit,
    QScrollArea,
    QWidget,
)

#: Widgets Tab stops at as a whole (their inner line edits are theirs).
_LEAVES = (QAbstractSpinBox, QComboBox, QLineEdit, QPlainTextEdit, QAbstractButton, QAbstractItemView)


def focus_chain(root: QWidget) -> list[QWidget]:
    """The widgets Tab can stop at under ``root``, in the order its layouts show them."""
    found: list[QWidget] = []

    def visit_layout(layout: Any) -> None:
        for index in range(layout.count()):
            item = layout.itemAt(index)
            if item.widget() is not None:
                visit(item.widget())
            elif item.layout() is not None:
                visit_layout(item.layout())

    def visit(widget: QWidget) -> None:
        if isinstance(widget, QScrollArea):
            if widget.widget() is not None:
                visit(widget.widget())
            return
        takes_tab = bool(widget.focusPolicy() & Qt.FocusPolicy.TabFocus)
        if isinstance(widget, _LEAVES):
            if takes_tab:
                found.append(widget)
            return
        if takes_tab:  # a checkable group box, then its fields
            found.append(widget)
        if widget.layout() is not None:
            visit_layout(widget.layout())

    visit(root)
    return found
