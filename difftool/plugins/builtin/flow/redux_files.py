"""Flux Redux's files on disk: the projector (``flux1-redux-dev.safetensors``, keys ``redux_up.*``,
``redux_down.*``, or FLUX.1-Redux-dev's diffusers folder) and its SigLIP vision encoder (ComfyUI's
``sigclip_vision_patch14_384.safetensors`` or a transformers folder), found as ComfyUI keeps them; wrong
files refused in one line naming both. See :mod:`flow.redux` for what runs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from difftool.core.errors import ModelError, ParameterError
from difftool.plugins.builtin.sd import checkpoint
from difftool.plugins.builtin.sd.ip_adapter_files import ENCODER_FOLDERS

#: Where ComfyUI keeps Redux projectors ("style models"), under a model root or a ``models/`` folder.
STYLE_FOLDERS = ("style_models", "models/style_models")
#: The files' prefix for the vision tower (transformers 4's layout; transformers 5 adds it back on loading).
VISION_PREFIX = "vision_model."
REDUX_KEYS = ("redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias")
#: SigLIP widths -> attention heads (the weights do not say): base, large, so400m.
_HEADS = {768: 12, 1024: 16, 1152: 16}


def _roots() -> list[Path]:
    from difftool.plugins.builtin.models import model_roots

    return model_roots()


def _folders(model_path: Path, subs: tuple[str, ...]) -> list[Path]:
    """``subs`` beside the model's ComfyUI ``models/`` folder, then under each model root."""
    folders = [model_path.parent.parent / sub.removeprefix("models/") for sub in subs]
    folders += [root / sub for root in _roots() for sub in subs]
    return [f for f in dict.fromkeys(folders) if f.is_dir()]


def is_redux(path: Path) -> bool:
    """A projector file (header only) or a diffusers Redux folder."""
    if path.is_dir():
        return (path / "image_embedder").is_dir() or _class_name(path) == "ReduxImageEncoder"
    try:
        return path.suffix.lower() == ".safetensors" and set(REDUX_KEYS) <= set(checkpoint.read_shapes(path))
    except ModelError:
        return False


def _class_name(folder: Path) -> str:
    try:
        return str(json.loads((folder / "config.json").read_text()).get("_class_name", ""))
    except (OSError, ValueError):
        return ""


def resolve_redux(name: Any, model_path: Path) -> Path:
    """``--ip-adapter`` (a file or folder, or a name in the style-model folders), or the first Redux found."""
    folders = _folders(model_path, STYLE_FOLDERS)
    listed = [child for folder in folders for child in sorted(folder.iterdir()) if is_redux(child)]
    if name:
        path = Path(name).expanduser()
        if path.exists():
            return path
        for child in listed:
            if str(name) in (child.name, child.stem):
                return child
        known = ", ".join(sorted({c.stem for c in listed})) or "none found"
        raise ModelError(
            f"Flux Redux model {str(name)!r} not found (listed: {known})",
            "pass flux1-redux-dev.safetensors, or put it in models/style_models under a model root",
        )
    if not listed:
        raise ParameterError(
            "--reference on a Flux model needs the Redux model (flux1-redux-dev.safetensors); none was found",
            "put it in models/style_models under a model root, or pass --ip-adapter FILE",
        )
    return listed[0]


def redux_width(path: Path, model: Any) -> int:
    """The SigLIP width the projector at ``path`` takes, from its header or config; a file that is no Redux,
    or a Redux for other text tokens than ``model``'s, is refused naming both."""
    if path.is_dir():
        try:
            config = json.loads((projector_folder(path) / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"{path.name} is not a Flux Redux folder (no image_embedder/config.json); model {model.name} takes one",
                "pass FLUX.1-Redux-dev's folder or flux1-redux-dev.safetensors as --ip-adapter",
            ) from exc
        width, tokens = int(config.get("redux_dim", 1152)), int(config.get("txt_in_features", 4096))
    else:
        shapes = checkpoint.read_shapes(path)  # a pickle is refused here
        if not set(REDUX_KEYS) <= set(shapes):
            what = "an IP-Adapter for Stable Diffusion" if any(k.startswith("image_proj.") for k in shapes) else (
                "not a Flux Redux model (no redux_up.* / redux_down.* weights)")  # fmt: skip
            raise ModelError(
                f"{path.name} is {what}; model {model.name} ({model.family.label}) takes a Flux Redux",
                "pass flux1-redux-dev.safetensors as --ip-adapter, or put it in models/style_models",
            )
        width, tokens = int(shapes["redux_up.weight"][1]), int(shapes["redux_down.weight"][0])
    theirs = int(model.transformer.config.joint_attention_dim)
    if tokens != theirs:
        raise ModelError(
            f"Flux Redux {path.name} makes tokens {tokens} wide; model {model.name} reads T5 embeddings {theirs} wide",
            "use a Redux model made for Flux.1 (flux1-redux-dev.safetensors)",
        )
    return width


def projector_folder(redux: Path) -> Path:
    return redux / "image_embedder" if (redux / "image_embedder").is_dir() else redux


def load_projector(path: Path) -> Any:
    """diffusers' ``ReduxImageEncoder`` from BFL's file (its key layout is diffusers') or a diffusers folder
    (checked first by :func:`redux_width`)."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    if path.is_dir():
        try:
            options = {"local_files_only": True, "use_safetensors": True}
            projector = ReduxImageEncoder.from_pretrained(projector_folder(path), **options)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load Flux Redux {path}: {str(exc).splitlines()[0]}", "check its files") from exc
    else:
        state = checkpoint.load_state_dict(path)
        up, down = state["redux_up.weight"], state["redux_down.weight"]
        projector = ReduxImageEncoder(redux_dim=int(up.shape[1]), txt_in_features=int(down.shape[0]))
        projector.load_state_dict(state)
    return projector.float().eval().requires_grad_(False)


def _siglip_width(path: Path) -> int | None:
    """The hidden size of a SigLIP vision folder or transformers-layout file (a CLIP one: ``None``)."""
    try:
        if path.is_dir():
            config = json.loads((path / "config.json").read_text())
            config = config.get("vision_config", config)
            return int(config["hidden_size"]) if "siglip" in str(config.get("model_type", "")) else None
        shapes = checkpoint.read_shapes(path)
    except (OSError, ValueError, KeyError, ModelError):
        return None
    shapes = {k.removeprefix(VISION_PREFIX): v for k, v in shapes.items()}
    patch = shapes.get("embeddings.patch_embedding.weight")
    if patch is None or "embeddings.class_embedding" in shapes:  # CLIP has a class token
        return None
    return int(patch[0])


def find_encoder(redux: Path, width: int, explicit: Any, model_path: Path) -> Path:
    """``explicit``, else image_encoder/ beside the projector (diffusers), else the first SigLIP ``width``
    wide in the clip_vision folders (ComfyUI)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise ParameterError(f"image encoder {path} does not exist", "pass a SigLIP vision folder or .safetensors")
        return path
    candidates = [redux / "image_encoder", redux.parent / "image_encoder", redux.parent.parent / "image_encoder"]
    folders = [redux.parent.parent / "clip_vision", *_folders(model_path, ENCODER_FOLDERS)]
    for folder in dict.fromkeys(f for f in folders if f.is_dir()):
        candidates += sorted(c for c in folder.iterdir() if c.is_dir() or c.suffix.lower() == ".safetensors")
    found = [c for c in dict.fromkeys(candidates) if c.exists()]
    for candidate in found:
        if _siglip_width(candidate) == width:
            return candidate
    seen = ", ".join(c.name for c in found) or "none"
    raise ModelError(
        f"no SigLIP image encoder {width} wide for Flux Redux {redux.name} (found: {seen})",
        "put sigclip_vision_patch14_384.safetensors in models/clip_vision under a model root, or pass --image-encoder",
    )


def load_encoder(path: Path, redux: Path, width: int) -> Any:
    """transformers' ``SiglipVisionModel`` from a folder or one ``.safetensors`` (ComfyUI's
    ``sigclip_vision_patch14_384``: ``vision_model.*``, with or without the pooling head, which Redux does not
    use; config read from the shapes), ``width`` wide."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    found = _siglip_width(path)
    if found != width:
        what = "not a SigLIP vision model" if found is None else f"{found} wide"
        raise ModelError(
            f"Flux Redux {redux.name} needs a SigLIP image encoder {width} wide; {path.name} is {what}",
            "pass sigclip_vision_patch14_384.safetensors (or FLUX.1-Redux-dev's image_encoder/) as --image-encoder",
        )
    if path.is_dir():
        try:
            return SiglipVisionModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load image encoder {path}: {str(exc).splitlines()[0]}", "check it") from exc
    state = {k.removeprefix(VISION_PREFIX): v for k, v in checkpoint.load_state_dict(path).items()}
    patch = state["embeddings.patch_embedding.weight"]
    positions = int(state["embeddings.position_embedding.weight"].shape[0])
    config = SiglipVisionConfig(
        hidden_size=width,
        intermediate_size=int(state["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")}),
        num_attention_heads=_HEADS.get(width, max(1, width // 64)),
        patch_size=int(patch.shape[-1]),
        image_size=int(round(positions**0.5)) * int(patch.shape[-1]),
        vision_use_head=any(k.startswith("head.") for k in state),
    )  # hidden_act gelu_pytorch_tanh, layer_norm_eps 1e-6: SigLIP's defaults
    encoder = SiglipVisionModel(config)
    state.pop("embeddings.position_ids", None)
    if any(k.startswith(VISION_PREFIX) for k in encoder.state_dict()):  # transformers 4 nests the tower
        state = {VISION_PREFIX + k: v for k, v in state.items()}
    from difftool.plugins.builtin.sd.ip_adapter_files import load_checked

    return load_checked(encoder, state, path, "SigLIP vision")
