"""ControlNet models from disk, offline: single files (original A1111/ComfyUI or diffusers key layout) and
diffusers folders; their family from the safetensors header; a cache of the ones a run uses.

A single file is converted by diffusers' ``ControlNetModel.from_single_file`` with the family's config
from this package (``configs/<family>/controlnet/``), or from a sidecar folder ``<file>.diffusers/``
holding ``config.json`` for a non-standard size (the tests' tiny models).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftool.core.atomic import file_sha256
from difftool.core.errors import ModelError
from difftool.core.runtime import current
from difftool.core.safetensors_check import check_safetensors
from difftool.core.task import RunContext
from difftool.plugins.builtin.sd import checkpoint
from difftool.plugins.builtin.sd.families import FAMILIES, Family, is_controlnet

#: Where A1111 and ComfyUI keep ControlNets under a model root.
CONTROLNET_FOLDERS = ("models/ControlNet", "models/controlnet", "ControlNet", "controlnet")
SUFFIX = "-controlnet"
_CONTEXT_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
#: ControlNets kept loaded between runs (a multi-unit job reuses them; each is 0.7 to 2.5 GB in fp16).
KEPT = 4


@dataclass
class ControlNet:
    """A loaded ControlNet: the diffusers module and what the record and the family check need."""

    path: Path
    base: str  # the family it was trained with: sd1, sd2 or sdxl
    module: Any
    sha256: str

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name


def base_from_shapes(shapes: Mapping[str, Sequence[int]], what: str) -> str:
    """sd1, sd2 or sdxl from a ControlNet file's tensor names and shapes (its cross-attention width)."""
    dims = {int(shape[1]) for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")}
    base = _CONTEXT_DIMS.get(dims.pop()) if len(dims) == 1 else None
    if base is None:
        raise ModelError(
            f"{what} is a ControlNet of no supported family (cross-attention widths {sorted(dims)})",
            "use an SD 1.x, SD 2.x or SDXL ControlNet",
        )
    return base


def base_from_config(config: Mapping[str, Any]) -> str:
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("use_linear_projection") else "sd1"


def detect(path: Path) -> str | None:
    """``sd1-controlnet`` etc. for a ControlNet file or folder (headers and configs only), else ``None``."""
    config = (path / "config.json") if path.is_dir() else path.with_name(path.name + ".diffusers") / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            return None
        return base_from_config(data) + SUFFIX if data.get("_class_name") == "ControlNetModel" else None
    if path.is_file() and path.suffix.lower() == ".safetensors":
        try:
            shapes = checkpoint.read_shapes(path)
            return base_from_shapes(shapes, path.name) + SUFFIX if is_controlnet(shapes) else None
        except ModelError:
            return None
    return None


def resolve(name: str, context: RunContext) -> Path:
    """A unit's model: a file or folder, or a name ``difftool models`` lists as a ControlNet."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    listed = [e for e in context.registry.find_models() if e.family.endswith(SUFFIX)]
    for entry in listed:
        if entry.name == name:
            return entry.path
    known = ", ".join(sorted(e.name for e in listed)) or "none found"
    raise ModelError(
        f"ControlNet {name!r} not found (listed: {known})",
        "pass a ControlNet file or folder, or put it in models/ControlNet under a model root",
    )


def load(path: Path, allow_pickle: bool = False, dtype: Any = None) -> ControlNet:
    """A ControlNet from a diffusers folder or a single file, in ``dtype`` (no fp32 copy in memory)."""
    from diffusers import ControlNetModel

    if path.is_dir():
        config = _read_config(path / "config.json")
        weights = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
        if not weights and not allow_pickle:
            raise ModelError(
                f"{path} holds no safetensors weights (pickles can run code when loaded)",
                "convert them to safetensors, or pass --allow-pickle if you trust the source",
            )
        for file in weights:
            check_safetensors(file)
        try:
            module = ControlNetModel.from_pretrained(
                path, torch_dtype=dtype, local_files_only=True, use_safetensors=bool(weights) or None
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load the ControlNet {path}: {_first_line(exc)}", "check its weights") from exc
        return ControlNet(path, base_from_config(config), module.eval(), file_sha256(weights[0]) if weights else "")
    if not path.is_file():
        raise ModelError(f"ControlNet {path} does not exist", "pass a ControlNet file or folder")
    state = checkpoint.load_state_dict(path, allow_pickle=allow_pickle)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if not is_controlnet(shapes):
        raise ModelError(f"{path.name} is not a ControlNet", "pass a ControlNet (.safetensors) to --control")
    sidecar = path.with_name(path.name + ".diffusers")
    if sidecar.is_dir():
        base, kwargs = base_from_config(_read_config(sidecar / "config.json")), {"config": str(sidecar)}
    else:
        base = base_from_shapes(shapes, path.name)
        kwargs = {"config": str(FAMILIES[base].config_dir), "subfolder": "controlnet"}
    try:
        if any(key.endswith(_LABEL_EMB) for key in state):  # SDXL in the original layout
            module = _original_sdxl(state, kwargs, dtype)
        else:
            module = ControlNetModel.from_single_file(state, torch_dtype=dtype, local_files_only=True, **kwargs)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{path.name} does not match the {base} ControlNet architecture: {_first_line(exc)}",
            "use a diffusers ControlNet folder (config.json + weights) for other sizes",
        ) from exc
    return ControlNet(path, base, module.eval(), file_sha256(path))


_LABEL_EMB = "label_emb.0.0.weight"


def _original_sdxl(state: dict[str, Any], where: dict[str, str], dtype: Any) -> Any:
    """An SDXL ControlNet from the original key layout. diffusers' single-file converter leaves out
    SDXL's added (text and size) embedding, ``label_emb``, and the model then keeps meta tensors: so
    convert with diffusers' own function, add those four tensors, and load strictly."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    config = ControlNetModel.load_config(where["config"], subfolder=where.get("subfolder"), local_files_only=True)
    prefix = next(key for key in state if key.endswith(_LABEL_EMB)).removesuffix(_LABEL_EMB)
    converted = convert_controlnet_checkpoint(state, config)
    for ours, theirs in (("linear_1", "0.0"), ("linear_2", "0.2")):
        for kind in ("weight", "bias"):
            converted[f"add_embedding.{ours}.{kind}"] = state[f"{prefix}label_emb.{theirs}.{kind}"]
    module = ControlNetModel.from_config(config)
    module.load_state_dict(converted, strict=True)
    return module.to(dtype) if dtype is not None else module


def check_family(net: ControlNet, family: Family, unet: Any) -> None:
    """Refuse a ControlNet trained for another family than the checkpoint's."""
    base = family.name.removesuffix("-inpaint")
    width = getattr(net.module.config, "cross_attention_dim", None)
    if net.base != base or width != unet.config.cross_attention_dim:
        raise ModelError(
            f"ControlNet {net.name} is a {net.base} ControlNet, the model is {family.label}",
            f"use a {base} ControlNet with this model (`difftool models` lists each one's family)",
        )


def loaded(path: Path, context: RunContext, allow_pickle: bool) -> ControlNet:
    """Load (or reuse) a ControlNet on the run's device in its precision; keeps the :data:`KEPT` used last."""
    import torch

    key = (str(path.resolve()), path.stat().st_mtime_ns, bool(allow_pickle), context.dtype, context.device)
    cache: dict[Any, ControlNet] = current().cache("sd-controlnets", dict)
    if key not in cache:
        net = load(path, allow_pickle, context.torch_dtype)
        torch.nn.Module.to(net.module, device=context.torch_device)
        net.module.requires_grad_(False)
        cache[key] = net
    cache[key] = cache.pop(key)  # most recently used last
    while len(cache) > KEPT:
        del cache[next(iter(cache))]
    return cache[key]


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} cannot be read: {_first_line(exc)}", "restore the ControlNet's config.json") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
