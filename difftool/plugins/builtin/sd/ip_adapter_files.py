"""IP-Adapter files on disk: the adapter (original key layout), its CLIP image encoder, the reference images.

Where people keep them: adapters in ``ipadapter/`` or ``models/ipadapter`` under the model roots
(ComfyUI), encoders beside the adapter (``image_encoder/``, the layout of h94/IP-Adapter) or in
``clip_vision/`` / ``models/clip_vision`` (ComfyUI, A1111). An encoder is a diffusers/transformers
folder (``config.json`` + weights) or one ``.safetensors`` in transformers' key layout, whose config is
read from its shapes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difftool.core.errors import ModelError, ParameterError
from difftool.core.task import RunContext
from difftool.plugins.builtin.sd import checkpoint

ADAPTER_FOLDERS = ("ipadapter", "models/ipadapter")
ENCODER_FOLDERS = ("clip_vision", "models/clip_vision")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_SUFFIXES = (".safetensors", ".bin")
#: CLIP ViT widths -> attention heads (the weights do not say): B, L, H, bigG.
_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}


def _roots() -> list[Path]:
    from difftool.plugins.builtin.models import model_roots

    return model_roots()


def resolve_adapter(name: str, context: RunContext) -> Path:
    """``--ip-adapter``: a file, or a file's name (with or without suffix) in the roots' ipadapter folders."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    listed = listed_adapters()
    for child in listed:
        if name in (child.name, child.stem):
            return child
    known = ", ".join(sorted({c.stem for c in listed})) or "none found"
    raise ModelError(
        f"IP-Adapter {name!r} not found (listed: {known})",
        "pass an IP-Adapter file, or put it in models/ipadapter under a model root",
    )


def listed_adapters() -> list[Path]:
    """The IP-Adapter files in the model roots' ipadapter folders (what a bare ``--ip-adapter`` name names)."""
    return [
        child
        for root in _roots()
        for sub in ADAPTER_FOLDERS
        if (root / sub).is_dir()
        for child in sorted((root / sub).iterdir())
        if child.suffix.lower() in _SUFFIXES and child.is_file()
    ]


def read_adapter(path: Path, allow_pickle: bool) -> dict[str, dict[str, Any]]:
    """``{"image_proj": ..., "ip_adapter": ...}`` from a ``.safetensors`` (flat, prefixed keys) or an
    original ``.bin`` (nested, only with ``allow_pickle``, loaded with weights_only)."""
    if checkpoint.is_pickle(path):
        data: Any = checkpoint.load_pickle(path, allow_pickle=allow_pickle)
        if isinstance(data, dict) and isinstance(data.get("image_proj"), dict):
            return {"image_proj": dict(data["image_proj"]), "ip_adapter": dict(data.get("ip_adapter") or {})}
        flat = data if isinstance(data, dict) else {}
    else:
        flat = checkpoint.load_state_dict(path)
    state: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head in state and rest:
            state[head][rest] = value
    if not state["image_proj"] or not state["ip_adapter"]:
        raise ModelError(
            f"{path.name} is not an IP-Adapter (no image_proj.* and ip_adapter.* weights)",
            "pass an IP-Adapter file such as ip-adapter_sd15.safetensors",
        )
    return state


def adapter_kind(state: dict[str, dict[str, Any]], path: Path) -> str:
    """plain, plus (the resampler: Plus, Plus Face) or full (Full Face); Face ID is refused."""
    proj = state["image_proj"]
    if "proj.weight" in proj:
        return "plain"
    if "proj.3.weight" in proj:
        return "full"
    if "latents" in proj and "proj_in.weight" in proj:
        return "plus"
    raise ModelError(
        f"{path.name} is an IP-Adapter kind difftool does not run (Face ID needs face embeddings)",
        "use IP-Adapter, IP-Adapter Plus or Plus Face",
    )


def _encoder_config_width(path: Path, hidden_states: bool) -> int | None:
    """The width an encoder gives (projection, or hidden states for Plus) without loading it."""
    try:
        if path.is_dir():
            config = json.loads((path / "config.json").read_text())
            config = config.get("vision_config", config)
            return int(config["hidden_size"] if hidden_states else config.get("projection_dim", 512))
        shapes = checkpoint.read_shapes(path)
    except (OSError, ValueError, KeyError, ModelError):
        return None
    key = "vision_model.embeddings.patch_embedding.weight" if hidden_states else "visual_projection.weight"
    return int(shapes[key][0]) if key in shapes else None


def find_encoder(adapter: Path, width: int, hidden_states: bool, explicit: Any = None) -> Path:
    """The image encoder for ``adapter`` (which needs ``width``): ``explicit``, else the first of
    image_encoder/ beside it (or its folder's parent) and the roots' clip_vision folders that fits."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise ParameterError(f"image encoder {path} does not exist", "pass a CLIP vision folder or .safetensors")
        return path
    candidates = [adapter.parent / "image_encoder", adapter.parent.parent / "image_encoder"]
    for root in _roots():
        for sub in ENCODER_FOLDERS:
            if (root / sub).is_dir():
                candidates += sorted(
                    c for c in (root / sub).iterdir() if c.is_dir() or c.suffix.lower() == ".safetensors"
                )
    found = [c for c in candidates if c.exists()]
    for candidate in found:
        if _encoder_config_width(candidate, hidden_states) == width:
            return candidate
    seen = ", ".join(c.name for c in found) or "none"
    raise ModelError(
        f"no image encoder {width} wide for IP-Adapter {adapter.name} (found: {seen})",
        "put its CLIP vision model in models/clip_vision under a model root, or pass --image-encoder",
    )


def encoder_width(encoder: Any, hidden_states: bool) -> int:
    config = encoder.config
    return int(config.hidden_size if hidden_states else config.projection_dim)


def load_encoder(path: Path) -> Any:
    """A ``CLIPVisionModelWithProjection`` from a folder or a single transformers-layout ``.safetensors``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if path.is_dir():
        try:
            return CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot load image encoder {path}: {str(exc).splitlines()[0]}", "check its files"
            ) from exc
    state = checkpoint.load_state_dict(path)
    prefix = "vision_model."
    patch = state.get(prefix + "embeddings.patch_embedding.weight")
    if patch is None or "visual_projection.weight" not in state:
        raise ModelError(
            f"{path.name} is not a CLIP vision model in transformers' layout",
            "use the image_encoder model.safetensors of h94/IP-Adapter (or ComfyUI's clip_vision files)",
        )
    width = int(patch.shape[0])
    layers = len({k.split(".")[3] for k in state if k.startswith(prefix + "encoder.layers.")})
    positions = int(state[prefix + "embeddings.position_embedding.weight"].shape[0])
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
        projection_dim=int(state["visual_projection.weight"].shape[0]),
        num_hidden_layers=layers,
        num_attention_heads=_HEADS.get(width, max(1, width // 64)),
        patch_size=int(patch.shape[-1]),
        image_size=int(round((positions - 1) ** 0.5)) * int(patch.shape[-1]),
        hidden_act="quick_gelu" if width == 1024 else "gelu",  # OpenAI's ViT-L; LAION's H and bigG: gelu
    )
    state.pop(prefix + "embeddings.position_ids", None)
    return load_checked(CLIPVisionModelWithProjection(config), state, path, "CLIP vision")


def load_checked(model: Any, state: dict[str, Any], path: Path, what: str) -> Any:
    """``model`` with ``state`` loaded, or a one-line error naming ``path`` if they do not match (position
    ids, a buffer transformers makes itself, may be absent)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelError(
            f"{path.name} does not match a {what} model ({len(missing)} missing, {len(unexpected)} unexpected)",
            f"use a transformers-layout {what} .safetensors or folder",
        )
    return model


def reference_files(values: Sequence[Any]) -> list[Any]:
    """Each ``--reference``: an image file, or a folder's images (sorted); an image already in memory (a
    :class:`~difftool.core.images.LoadedImage`: one a server decoded from a request) stays as it is."""
    from difftool.core.images import LoadedImage

    files: list[Any] = []
    for value in values:
        if isinstance(value, LoadedImage):
            files.append(value)
            continue
        path = Path(value).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ParameterError(f"--reference folder {path} holds no images", "pass an image or a folder of them")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ParameterError(f"--reference {path} does not exist", "pass an image file or a folder of images")
    return files
