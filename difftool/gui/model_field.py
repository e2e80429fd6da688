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


#: The entry that stands for "none" (no refiner), where no keyword means the default.
NONE_LABEL = "(none)"


class ModelNameField(QComboBox):
    """Keywords, then the listed models of the parameter's families; never a blank entry: "(none)" where the
    default is none, else the default keyword (latent, embedded) first. An emptied field is the default."""

    def __init__(self, param: Param, models: Sequence[Any]) -> None:
        super().__init__()
        self.param = param
        families, keywords = MODEL_PARAMS[param.name]
        self.setEditable(True)
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(8)
        self.none = param.default is None and not keywords  # refiner: none by default
        if self.none:
            self.addItem(NONE_LABEL)
        self.addItems(list(keywords) + sorted(m.name for m in models if m.family in families))
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
