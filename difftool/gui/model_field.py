"""An editable list of the listed models a string parameter may name (``--refiner``, ``--hires-upscaler``,
``upscale-sd``'s ``--upscaler``): pick one, or type a keyword, a file or a folder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PySide6.QtWidgets import QComboBox

from difftool.core.task import Param

#: Built-in string parameters that name a listed model: the families offered and the keywords they
#: also take (the same table the server checks them with, in difftool/serve/security.py).
MODEL_PARAMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "refiner": (("sdxl-refiner",), ()),
    "hires_upscaler": (("difftool-superres", "upscaler"), ("latent", "embedded")),
    "upscaler": (("difftool-superres", "upscaler"), ("embedded", "lanczos")),
}


def offers_models(param: Param) -> bool:
    return param.type == "string" and not param.multiple and param.name in MODEL_PARAMS


class ModelNameField(QComboBox):
    """Keywords, then the listed models of the parameter's families; empty means the default."""

    def __init__(self, param: Param, models: Sequence[Any]) -> None:
        super().__init__()
        self.param = param
        families, keywords = MODEL_PARAMS[param.name]
        self.setEditable(True)
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(8)
        self.addItem("")
        self.addItems(list(keywords) + sorted(m.name for m in models if m.family in families))
        self.lineEdit().setPlaceholderText(str(param.default) if param.default is not None else "none")
        self.reset()

    def value(self) -> str | None:
        return self.currentText().strip() or None

    def set_value(self, value: Any) -> None:
        self.setCurrentText(str(value))

    def reset(self) -> None:
        self.setCurrentText("" if self.param.default is None else str(self.param.default))
