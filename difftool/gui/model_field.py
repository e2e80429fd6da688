"""An editable list of the listed models a model parameter may name (``--refiner``, ``--hires-upscaler``,
``upscale-sd``'s ``--upscaler``, a plugin's own): pick one, or type a keyword, a file or a folder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PySide6.QtWidgets import QComboBox

from difftool.core.task import Param


def offers_models(param: Param) -> bool:
    """A model parameter (its declared families and keywords say what to offer)."""
    return param.type == "model" and not param.multiple


def runs_family(registry: Any, task: Any, family: str) -> bool:
    """Whether ``task`` runs a listed model of ``family``: one of its own :attr:`~Task.model_families`, or one
    a family plugin runs it for (``register_families``: SD 3.5 and Flux for ``generate`` and ``style``). The
    preflight resolves ``--model`` among the same families (:mod:`difftool.app.plan`)."""
    if task.accepts_family(family):
        return True
    return bool(task.uses_model) and family in registry.delegated_families(task.name)


#: The entry that stands for "none" (no refiner), where no keyword means the default.
NONE_LABEL = "(none)"


class ModelNameField(QComboBox):
    """Keywords, then the listed models of the parameter's families; never a blank entry: "(none)" where the
    default is none, else the default keyword (latent, embedded) first. An emptied field is the default."""

    def __init__(self, param: Param, models: Sequence[Any]) -> None:
        super().__init__()
        self.param = param
        families, keywords = param.families, param.keywords
        self.setEditable(True)
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(8)
        self.none = param.default is None and not keywords  # refiner: none by default
        if self.none:
            self.addItem(NONE_LABEL)
        self.addItems(list(keywords) + sorted(m.name for m in models if not families or m.family in families))
        default = param.default if param.default is not None else (keywords[0] if keywords else "none")
        self.lineEdit().setPlaceholderText(f"{default} (default)")
        self.reset()

    def value(self) -> str | None:
        text = self.currentText().strip()
        return None if text in ("", NONE_LABEL) else text

    def set_value(self, value: Any) -> None:
        self.setCurrentText(str(value))

    def reset(self) -> None:
        if self.none:
            self.setCurrentIndex(0)
        else:
            self.setCurrentText("" if self.param.default is None else str(self.param.default))
