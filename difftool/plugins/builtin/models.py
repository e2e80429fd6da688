"""Finds models in ``~/.difftool/models``, ``$DIFFTOOL_MODELS`` and A1111 / ComfyUI folder layouts."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from difftool.core.models import ModelEntry, ModelSource
from difftool.plugins.builtin import pixel_model, upscalers
from difftool.plugins.builtin.sd import controlnet
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
    *controlnet.CONTROLNET_FOLDERS,
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
    unet_config = path / "unet" / "config.json"
    if unet_config.is_file():
        from difftool.core.errors import ModelError
        from difftool.plugins.builtin.sd.families import family_from_unet_config

        try:
            return family_from_unet_config(json.loads(unet_config.read_text()), path).name
        except (OSError, json.JSONDecodeError, ModelError):
            return "diffusers (unsupported U-Net)"
    if (path / "model_index.json").is_file():
        return "diffusers-pipeline"
    from difftool.plugins.builtin.flow import controlnet as flow_controlnet  # SD3 / Flux ControlNets

    return controlnet.detect(path) or flow_controlnet.detect(path)


def detect_file(path: Path) -> str:
    """What a weights file holds, from its safetensors header only: a family, ``lora``, ``vae``, or why not."""
    from difftool.core.errors import ModelError
    from difftool.plugins.builtin.sd.checkpoint import read_shapes
    from difftool.plugins.builtin.sd.families import component_kind, detect_family

    sidecar = path.with_name(path.name + ".diffusers")
    if sidecar.is_dir():  # configs beside a checkpoint of a non-standard size (see sd/loader.py)
        return detect_folder(sidecar) or controlnet.detect(path) or "unsupported checkpoint"
    if path.suffix.lower() != ".safetensors":
        return "pickle (needs --allow-pickle)"
    try:
        shapes = read_shapes(path)
    except ModelError as error:
        return f"unreadable ({error.problem})"
    from difftool.plugins.builtin.flow import controlnet as flow_controlnet

    if (arch := flow_controlnet.arch_from_shapes(shapes)) is not None:  # SD3 / Flux ControlNets
        return flow_controlnet.FAMILIES[arch]
    try:
        kind = component_kind(shapes)
        if kind == "controlnet":
            return controlnet.base_from_shapes(shapes, path.name) + controlnet.SUFFIX
        return detect_family(shapes).name if kind == "checkpoint" else kind
    except ModelError:
        return "unsupported checkpoint"


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
                    if child.is_dir() and not child.name.endswith(".diffusers"):  # not a checkpoint's sidecar
                        family = detect_folder(child)
                        if family:
                            found.append(ModelEntry(child.name, child, family, str(root)))
                    elif child.suffix.lower() in WEIGHT_SUFFIXES:
                        found.append(ModelEntry(child.stem, child, detect_file(child), str(root)))
            for sub in upscalers.UPSCALER_FOLDERS:  # community upscalers: superres --model NAME
                folder = root / sub
                if folder.is_dir():
                    found += [
                        ModelEntry(child.stem, child, upscalers.FAMILY, str(root))
                        for child in sorted(folder.iterdir())
                        if child.is_file() and child.suffix.lower() in upscalers.UPSCALER_SUFFIXES
                    ]
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
