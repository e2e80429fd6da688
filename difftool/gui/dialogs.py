"""The app's dialogs: Help > About, File > Connect to server, Edit > Reuse parameters from an image file."""

from __future__ import annotations

from PySide6.QtWidgets import (
    QApplication,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from difftool.core.task import RegistryView


def about_dialog(parent: QWidget, registry: RegistryView) -> QDialog:
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


def ask_server(parent: QWidget, url: str) -> tuple[str, str | None] | None:
    """The server's address and API token (empty: none), or ``None`` if the user cancels."""
    dialog = QDialog(parent)
    dialog.setWindowTitle("Connect to a difftool server")
    address, token = QLineEdit(url), QLineEdit()
    token.setEchoMode(QLineEdit.EchoMode.Password)
    token.setPlaceholderText("only if the server was started with --api-token")
    form = QFormLayout(dialog)
    form.addRow(QLabel("Runs every job on a `difftool serve` machine (e.g. the team's GPU box)."))
    form.addRow("address", address)
    form.addRow("API token", token)
    buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
    buttons.accepted.connect(dialog.accept)
    buttons.rejected.connect(dialog.reject)
    form.addRow(buttons)
    if dialog.exec() != QDialog.DialogCode.Accepted or not address.text().strip():
        return None
    return address.text().strip(), token.text() or None


def ask_reuse_files(
    parent: QWidget, name: str, files: dict[str, list[str]], missing: dict[str, list[str]]
) -> bool | None:
    """Whether to fill the files an image's record names (``True``), leave them empty (``False``), or
    reuse nothing (``None``). Only files that exist here are listed; the record may come from anyone."""
    lines = [f"• {key.replace('_', ' ')}: {', '.join(paths)}" for key, paths in files.items()]
    gone = [f"• {key.replace('_', ' ')}: {', '.join(paths)}" for key, paths in missing.items()]
    box = QMessageBox(QMessageBox.Icon.Question, "Reuse parameters", "", parent=parent)
    box.setText(
        f"The parameters in {name} name these files on this machine. A run reads them: fill them only if "
        "you trust where the image came from."
    )
    box.setInformativeText(
        "\n".join(lines + (["", "Not found here (left empty):", *gone] if gone else []))
        + '\n\n"allow pickle" is never taken from an image file.'
    )
    fill = box.addButton("Fill these files too", QMessageBox.ButtonRole.AcceptRole)
    leave = box.addButton("Leave them empty", QMessageBox.ButtonRole.DestructiveRole)
    box.addButton(QMessageBox.StandardButton.Cancel)
    box.setDefaultButton(leave)
    box.exec()
    clicked = box.clickedButton()
    return True if clicked is fill else False if clicked is leave else None
