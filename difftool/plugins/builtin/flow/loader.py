"""Loading SD3 / Flux models offline: diffusers folders, all-in-one files, and transformer-only files whose
text encoders and VAE lie in the model roots the way ComfyUI users keep them.

All-in-one files (SD 3.5 from Stability, ComfyUI's saved checkpoints) hold ``model.diffusion_model.*``,
``first_stage_model.*`` and ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``. A transformer-only
file (``flux1-dev.safetensors``: ``double_blocks.*``) takes the rest from files found by name:
``clip_l*``, ``clip_g*``, ``t5xxl*`` (``models/text_encoders``, ``models/clip``) and ``ae.safetensors``
(``models/vae``), beside the model, in its ComfyUI ``models/`` folder, or under a model root.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftool.core.atomic import file_sha256
from difftool.core.errors import ModelError
from difftool.plugins.builtin.flow import convert, fp8, gguf_files
from difftool.plugins.builtin.flow.families import PREFIX, FlowFamily, detect_folder, detect_shapes
from difftool.plugins.builtin.flow.tokenizers import clip_tokenizer, folder_tokenizer, t5_tokenizer
from difftool.plugins.builtin.sd import checkpoint

if TYPE_CHECKING:
    import torch

#: Each text encoder: (all-in-one prefix, file name patterns, diffusers folder per architecture).
ENCODERS = {
    "clip_l": ("text_encoders.clip_l.transformer.", ("clip_l*.safetensors",)),
    "clip_g": ("text_encoders.clip_g.transformer.", ("clip_g*.safetensors",)),
    "t5": ("text_encoders.t5xxl.transformer.", ("t5xxl*.safetensors", "t5*.safetensors")),
}
FOLDERS = {
    "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"},
    "flux": {"clip_l": "text_encoder", "t5": "text_encoder_2"},
}
VAE_PATTERNS = {"flux": ("ae.safetensors", "flux*vae*.safetensors"), "sd3": ("sd3*vae*.safetensors",)}
#: Where ComfyUI and A1111 keep text encoders and VAEs, relative to a model root or a ``models/`` folder.
COMPANION_FOLDERS = ("text_encoders", "clip", "vae", "VAE", "models/text_encoders", "models/clip", "models/vae")


@dataclass
class FlowModel:
    """A loaded SD3 or Flux model: diffusers modules plus what the pipeline needs to run them."""

    path: Path
    family: FlowFamily
    transformer: Any
    vae: Any
    #: ``clip_l``, ``clip_g`` (SD3) and ``t5`` -> module; SD3 runs without T5 (zeros, as diffusers does).
    encoders: dict[str, Any]
    tokenizers: dict[str, Any]
    scheduler_config: dict[str, Any]
    sha256: str
    #: Which file each component came from, when not the model itself (recorded in the metadata).
    sources: dict[str, str] = field(default_factory=dict)
    #: LoRAs merged into the weights: (name, weight, sha256).
    loras: list[tuple[str, float, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.name, "model_hash": self.sha256[:10], "model_family": self.family.name}
        if "vae" in self.sources:
            out["vae"] = self.sources["vae"]
        if self.loras:  # as the SD plugin records them (A1111's "Lora hashes")
            out["loras"] = [f"{name}:{weight:g}" for name, weight, _ in self.loras]
            out["lora_hashes"] = ", ".join(f"{name}: {digest[:12]}" for name, _, digest in self.loras)
        return out


def is_flow_model(path: Path) -> FlowFamily | None:
    """The family of an SD3 / Flux folder, ``.safetensors`` or ``.gguf`` file (header only), or ``None``."""
    path = Path(path)
    if path.is_dir():
        return detect_folder(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_files.family_of(path)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        try:
            return detect_shapes(checkpoint.read_shapes(path))
        except ModelError:
            return None
    return None


def load_flow_model(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    vae: str | Path | None = None,
    roots: tuple[Path, ...] = (),
) -> FlowModel:
    """Load a folder or single file; ``dtype``: the transformer's (the run's precision). ``roots``: model roots
    searched for the text encoders and VAE a transformer-only file lacks."""
    path = Path(path).expanduser()
    model = _load_folder(path, dtype) if path.is_dir() else _load_file(path, dtype, roots)
    if vae is not None:
        vae_path = Path(vae).expanduser()
        model.vae = _vae_from(vae_path, model.family)
        model.sources["vae"] = vae_path.stem
    return model


def _load_folder(path: Path, dtype: torch.dtype | None) -> FlowModel:
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    family = detect_folder(path)
    if family is None:
        raise ModelError(f"{path} is not an SD3 or Flux model folder", "pass a diffusers folder or a .safetensors file")
    names = FOLDERS[family.arch]
    kinds = {"clip_l": CLIPTextModelWithProjection if family.arch == "sd3" else CLIPTextModel,
             "clip_g": CLIPTextModelWithProjection, "t5": T5EncoderModel}  # fmt: skip
    cls = SD3Transformer2DModel if family.arch == "sd3" else FluxTransformer2DModel
    options = {"local_files_only": True, "use_safetensors": True}
    try:
        transformer = cls.from_pretrained(path, subfolder="transformer", torch_dtype=dtype, **options)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **options)
        encoders = {
            role: kinds[role].from_pretrained(path / folder, **options)
            for role, folder in names.items()
            if (path / folder / "config.json").is_file()
        }
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load the model folder {path}: {_first_line(exc)}", "check its weights") from exc
    tokenizers = {role: folder_tokenizer(path / folder.replace("text_encoder", "tokenizer"), role)
                  for role, folder in names.items()}  # fmt: skip
    model = FlowModel(path, family, transformer, vae, encoders, tokenizers, _scheduler_config(path, family), "")
    _require(model, path.name)
    weights = sorted((path / "transformer").glob("*.safetensors"))
    model.sha256 = file_sha256(weights[0]) if weights else ""
    return model


def _scheduler_config(path: Path, family: FlowFamily) -> dict[str, Any]:
    import json

    config_file = path / "scheduler" / "scheduler_config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else family.scheduler_config()


def _load_file(path: Path, dtype: torch.dtype | None, roots: tuple[Path, ...]) -> FlowModel:
    if not path.is_file():
        raise ModelError(f"model {path} does not exist", "pass a .safetensors file or a diffusers model folder")
    quantised = path.suffix.lower() == ".gguf"
    state = gguf_files.load_state_dict(path) if quantised else checkpoint.load_state_dict(path)
    family = detect_shapes(convert.shapes_of(state))
    if family is None:
        raise ModelError(f"{path.name} holds no SD3 or Flux transformer", "pass an SD 3.5 or Flux.1 model")
    transformer = _transformer(state, family, dtype, quantised)
    sources: dict[str, str] = {}
    encoders: dict[str, Any] = {}
    roles = ("clip_l", "clip_g", "t5") if family.arch == "sd3" else ("clip_l", "t5")
    for role in roles:
        prefix, patterns = ENCODERS[role]
        weights = convert.strip(state, prefix)
        if not weights and (found := find_companion(path, patterns, roots)) is not None:
            weights, sources[role] = checkpoint.load_state_dict(found), found.name
        if weights:
            encoders[role] = _encoder(weights, role, family)
    vae_weights = convert.strip(state, "first_stage_model.") or convert.strip(state, "vae.")
    if vae_weights:
        vae = convert.vae(vae_weights, family)
    elif (found := find_companion(path, VAE_PATTERNS[family.arch], roots)) is not None:
        vae, sources["vae"] = _vae_from(found, family), found.stem
    else:
        raise _missing(path, family, "VAE", VAE_PATTERNS[family.arch][0], "models/vae")
    del state
    tokenizers = {"clip_l": clip_tokenizer("clip_l"), "clip_g": clip_tokenizer("clip_g"), "t5": t5_tokenizer()}
    model = FlowModel(path, family, transformer, vae, encoders, tokenizers, family.scheduler_config(), "", sources)
    _require(model, path.name)
    model.sha256 = file_sha256(path)
    return model


def _transformer(state: dict[str, Any], family: FlowFamily, dtype: torch.dtype | None, quantised: bool) -> Any:
    if quantised:  # GGUF: stays quantised; each layer is dequantised in ``dtype`` as it runs
        return gguf_files.transformer(*convert.transformer_parts(state, family), dtype)
    transformer = convert.transformer(state, family)
    storage = fp8.storage_dtype(convert.strip(state, PREFIX) or state)
    if storage is not None and dtype is not None:
        fp8.keep_in_fp8(transformer, storage, dtype)  # stays fp8 in memory; computes in ``dtype``
    elif dtype is not None:
        import torch

        torch.nn.Module.to(transformer, dtype=dtype)
    return transformer


def _encoder(weights: dict[str, Any], role: str, family: FlowFamily) -> Any:
    if role == "t5":
        return convert.t5(weights)
    return convert.clip(weights, role, projection=family.arch == "sd3")


def _vae_from(path: Path, family: FlowFamily) -> Any:
    if path.is_dir():
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=True)
    state = checkpoint.load_state_dict(path)
    return convert.vae(convert.strip(state, "first_stage_model.") or convert.strip(state, "vae.") or state, family)


def _require(model: FlowModel, what: str) -> None:
    needed = ("clip_l", "clip_g") if model.family.arch == "sd3" else ("clip_l", "t5")
    for role in needed:
        if role not in model.encoders:
            pattern = ENCODERS[role][1][0].replace("*", "")
            raise _missing(model.path, model.family, f"{role} text encoder", pattern, "models/text_encoders")


def _missing(path: Path, family: FlowFamily, what: str, pattern: str, folder: str) -> ModelError:
    return ModelError(
        f"{path.name} ({family.label}) has no {what}, and none was found beside it or in the model roots",
        f"put the {what} file ({pattern}) in {folder} under a model root, or beside the model",
    )


def companion_folders(path: Path, roots: tuple[Path, ...]) -> list[Path]:
    """Where a transformer-only file's text encoders and VAE may be: its folder, its ComfyUI ``models/``
    folder (``models/diffusion_models/x.safetensors`` -> ``models/text_encoders``), then each model root."""
    folders = [path.parent, *(path.parent.parent / sub for sub in COMPANION_FOLDERS)]
    for root in roots:
        folders += [root, *(root / sub for sub in COMPANION_FOLDERS)]
    return [f for f in dict.fromkeys(folders) if f.is_dir()]


def find_companion(path: Path, patterns: tuple[str, ...], roots: tuple[Path, ...]) -> Path | None:
    for folder in companion_folders(path, roots):
        for pattern in patterns:
            # Sorted: t5xxl_fp16 before t5xxl_fp8_e4m3fn, so the full-precision copy wins when both are there.
            found = sorted(p for p in folder.glob(pattern) if p.is_file() and p != path)
            if found:
                return found[0]
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
