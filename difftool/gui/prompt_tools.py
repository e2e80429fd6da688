"""Edit > Insert into prompt: the LoRAs and textual-inversion embeddings this machine has, by name.

A1111 users type ``<lora:NAME:WEIGHT>`` and embedding names from memory; the menu lists what the model
roots hold (the same places the run looks) and inserts the text at the prompt's cursor.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import QMenu, QPlainTextEdit

from difftool.core.task import RegistryView


def prompt_names(registry: RegistryView) -> tuple[list[str], list[str]]:
    """The names of the LoRAs and embeddings found in the model roots (empty when connected to a server)."""
    if not hasattr(registry, "model_sources"):  # a server's registry: its files are not ours to list
        return [], []
    from difftool.plugins.builtin.sd.embeddings import candidates

    loras = sorted(e.name for e in registry.find_models() if e.family == "lora")
    return loras, sorted(candidates(None))


def insert_into_prompt(window: Any, text: str) -> bool:
    """Insert ``text`` at the prompt's cursor (the form's ``prompt`` field); ``False`` if the task has none."""
    field = window.form.widgets.get("prompt")
    if not isinstance(field, QPlainTextEdit):
        window.statusBar().showMessage(f"{window.form.task.name} has no prompt to insert {text} into", 5000)
        return False
    cursor = field.textCursor()
    before = field.toPlainText()[: cursor.position()]
    cursor.insertText(("" if not before or before.endswith((" ", "\n")) else " ") + text)
    field.setTextCursor(cursor)
    return True


def fill_insert_menu(menu: QMenu, window: Any) -> None:
    """(Re)list the LoRAs and embeddings each time the menu opens: files added meanwhile show up."""
    menu.clear()
    loras, embeddings = prompt_names(window.registry)
    for title, names, text in (("LoRA", loras, "<lora:{}:1>"), ("Embedding", embeddings, "{}")):
        sub = menu.addMenu(title + "s")
        sub.setEnabled(bool(names))
        for name in names:
            sub.addAction(name, lambda n=name, t=text: insert_into_prompt(window, t.format(n)))
    if not loras and not embeddings:
        menu.addAction("(none in the model roots' Lora and embeddings folders)").setEnabled(False)
