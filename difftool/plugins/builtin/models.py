"""Finds models in ``~/.difftool/models``, ``$DIFFTOOL_MODELS`` and A1111 / ComfyUI folder layouts."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from difftool.core.models import ModelEntry, ModelSource
from difftool.plugins.builtin import pixel_model
from difftool.plugins.hookspecs import hookimpl

#: Sub-folders where A1111 and ComfyUI keep checkpoints, LoRAs and VAEs.
KNOWN_SUBFOLDERS = (
    "models/Stable-diffusion",
    "models/checkpoints",
    "models/Lora",
    "models/loras",
    "models/VAE",
    "models/vae",
    "Stable-diffusion",
    "checkpoints",
    "Lora",
    "VAE",
)
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def model_roots() -> list[Path]:
    """Folders searched for models, in order: ``$DIFFTOOL_MODELS`` (os.pathsep-separated), ``~/.difftool/models``."""
    roots = [Path(p).expanduser() for p in os.environ.get("DIFFTOOL_MODELS", "").split(os.pathsep) if p]
    roots.append(Path("~/.difftool/models").expanduser())
    return roots


def detect_folder(path: Path) -> str | None:
    """The family of a model folder, or ``None`` if it is not one."""
    meta = path / pixel_model.META_FILE
    if meta.is_file():
        try:
            return f"difftool-{json.loads(meta.read_text()).get('task', '?')}"
        except (OSError, json.JSONDecodeError):
            return "difftool-(unreadable difftool.json)"
    if (path / "model_index.json").is_file():
        return "diffusers-pipeline"
    return None


class FolderModelSource(ModelSource):
    name = "folders"

    def find(self) -> list[ModelEntry]:
        found: list[ModelEntry] = []
        for root in model_roots():
            if not root.is_dir():
                continue
            folders = [root] + [root / sub for sub in KNOWN_SUBFOLDERS if (root / sub).is_dir()]
            for folder in folders:
                for child in sorted(folder.iterdir()):
                    if child.is_dir():
                        family = detect_folder(child)
                        if family:
                            found.append(ModelEntry(child.name, child, family, str(root)))
                    elif child.suffix.lower() in WEIGHT_SUFFIXES:
                        kind = (
                            "pickle (needs --allow-pickle)" if child.suffix.lower() != ".safetensors" else "single file"
                        )
                        found.append(ModelEntry(child.stem, child, kind, str(root)))
        return found


class EmbeddedModelSource(ModelSource):
    name = "embedded"

    def find(self) -> list[ModelEntry]:
        root = pixel_model.EMBEDDED_ROOT
        if not root.is_dir():
            return []
        return [
            ModelEntry(f"embedded/{p.name}", p, family, "difftool package")
            for p in sorted(root.iterdir())
            if p.is_dir() and (family := detect_folder(p))
        ]


@hookimpl
def register_models(register: Callable[[ModelSource], None]) -> None:
    register(EmbeddedModelSource())
    register(FolderModelSource())
