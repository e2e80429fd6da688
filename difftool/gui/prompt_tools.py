"""The prompt box's helpers: Edit > Insert into prompt (LoRAs and embeddings by name) and recent prompts.

A1111 users type ``<lora:NAME:WEIGHT>`` and embedding names from memory; the menu lists what the model
roots hold (the same places the run looks) and inserts the text at the prompt's cursor.
"""

from __future__ import annotations

import json
from typing import Any

from PySide6.QtCore import Qt
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


#: Prompts kept per task and field, newest first (A1111 and ComfyUI users expect their recent prompts back).
RECENT_PROMPTS = 20
#: The fields whose text the history keeps.
PROMPT_FIELDS = ("prompt", "negative_prompt")


def remember_prompts(settings: Any, task: str, values: dict[str, Any]) -> None:
    """Put this run's prompts first in ``task``'s history (each once, at most :data:`RECENT_PROMPTS`)."""
    for name in PROMPT_FIELDS:
        text = values.get(name)  # a form's raw values: a task without this field has none
        if isinstance(text, str) and text.strip():
            kept = [p for p in recent_prompts(settings, task, name) if p != text]
            settings.setValue(f"prompts/{task}/{name}", json.dumps([text, *kept][:RECENT_PROMPTS]))


def recent_prompts(settings: Any, task: str, name: str = "prompt") -> list[str]:
    """``task``'s recent texts of field ``name``, newest first (none from a settings file edited by hand)."""
    try:
        found = json.loads(str(settings.value(f"prompts/{task}/{name}", "[]")))
    except ValueError:
        return []
    return [p for p in found if isinstance(p, str)] if isinstance(found, list) else []


def attach_prompt_history(form: Any, settings: Any) -> None:
    """Give the form's prompt boxes a "Recent prompts" submenu in their right-click menu."""
    for name in PROMPT_FIELDS:
        field = form.widgets.get(name)
        if isinstance(field, QPlainTextEdit):
            field.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
            field.customContextMenuRequested.connect(
                lambda point, f=field, n=name: prompt_menu(f, settings, form.task.name, n).exec(f.mapToGlobal(point))
            )


def prompt_menu(field: QPlainTextEdit, settings: Any, task: str, name: str) -> QMenu:
    """The text box's own menu (cut, copy, paste...) with the task's recent prompts below: one replaces the text."""
    menu = field.createStandardContextMenu()
    recent = menu.addMenu("Recent prompts")
    texts = recent_prompts(settings, task, name)
    recent.setEnabled(bool(texts))
    for text in texts:
        shown = " ".join(text.split())
        item = recent.addAction(shown if len(shown) <= 80 else shown[:77] + "...", lambda t=text: field.setPlainText(t))
        item.setToolTip(text)
    return menu
