"""The app's dialogs: Help > About."""

from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import QApplication, QDialog, QLabel, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget


def about_dialog(parent: QWidget, registry: Any) -> QDialog:
    """The same report as `difftool info`, with a button to copy it for a bug report; shown, not modal."""
    from difftool.info import as_text, collect

    dialog = QDialog(parent)
    dialog.setWindowTitle("About difftool")
    text = QPlainTextEdit(as_text(collect(registry)))
    text.setReadOnly(True)
    copy = QPushButton("Copy to clipboard")
    copy.clicked.connect(lambda: QApplication.clipboard().setText(text.toPlainText()))
    layout = QVBoxLayout(dialog)
    layout.addWidget(QLabel("What this install can do. Paste it into bug reports (docs/bug-report.md)."))
    layout.addWidget(text)
    layout.addWidget(copy)
    dialog.resize(780, 540)
    dialog.show()
    return dialog
