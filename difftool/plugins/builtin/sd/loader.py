"""Loading Stable Diffusion models from disk, offline: diffusers folders and single-file checkpoints.

A single file in the original (LDM / A1111 / ComfyUI) key layout is converted by diffusers'
``from_single_file`` with the family's configs from this package (``configs/``), or from a sidecar
folder ``<checkpoint>.diffusers/`` holding ``unet/config.json`` etc. for non-standard architectures.
Nothing is fetched: every call passes ``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftool.core.atomic import file_sha256
from difftool.core.errors import ModelError
from difftool.core.safetensors_check import check_safetensors
from difftool.plugins.builtin.sd import checkpoint
from difftool.plugins.builtin.sd.families import Family, detect_family, family_from_unet_config, fix_for
from difftool.plugins.builtin.sd.tokenizer import clip_tokenizer

if TYPE_CHECKING:
    import torch

log = logging.getLogger("difftool")
SIDECAR_SUFFIX = ".diffusers"
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}


@dataclass
class SDModel:
    """A loaded Stable Diffusion model: diffusers modules plus what a task needs to know to run them."""

    path: Path
    family: Family
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    sha256: str
    loras: list[tuple[str, float, str]] = field(default_factory=list)
    vae_name: str | None = None

    def __post_init__(self) -> None:
        if self.family.xl:
            # The exporters size SDXL's ``time_ids`` input from this: the U-Net's config cannot tell a
            # refiner (aesthetic score: 5 values) from a base (target size: 6) of unusual widths.
            self.unet.added_time_ids = 5 if self.family.refiner else 6

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def native_size(self) -> int:
        """The resolution the model was trained at, from its U-Net config (SD 1.x: 512, SDXL: 1024)."""
        sample_size = self.unet.config.sample_size
        size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        return int(size) * self.vae_scale if size else self.family.native_size

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_id(self) -> str:
        """Identifies the U-Net's weights (checkpoint hash + fused LoRAs): exported artifacts are keyed by it."""
        if not self.loras:
            return self.sha256
        loras = ",".join(f"{digest}:{weight:g}" for _, weight, digest in self.loras)
        return hashlib.sha256(f"{self.sha256}|{loras}".encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        """What the output metadata says about the model (A1111's ``Model``, ``Model hash``, ``Lora hashes``)."""
        out: dict[str, Any] = {"model": self.name, "model_hash": self.sha256[:10], "model_family": self.family.name}
        if self.vae_name:
            out["vae"] = self.vae_name
        if self.loras:
            out["loras"] = [f"{name}:{weight:g}" for name, weight, _ in self.loras]
            out["lora_hashes"] = ", ".join(f"{name}: {digest[:12]}" for name, _, digest in self.loras)
        return out


def is_sd_model(path: Path) -> bool:
    """Whether ``path`` looks like a Stable Diffusion model (diffusers folder or checkpoint file)."""
    path = Path(path)
    if path.is_dir():
        return (path / "unet" / "config.json").is_file()
    return path.is_file() and path.suffix.lower() in (".safetensors", *checkpoint.PICKLE_SUFFIXES)


def native_size(path: str | Path) -> int | None:
    """The resolution the model at ``path`` was trained at (:attr:`SDModel.native_size`) from its configs or its
    safetensors header, without loading weights; ``None`` when only loading would tell (a pickle, a bad file)."""
    path = Path(path).expanduser()
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    folder = path if path.is_dir() else sidecar if sidecar.is_dir() else None
    try:
        if folder is not None:
            unet, vae = (_read_json(folder / part / "config.json") for part in ("unet", "vae"))
        elif path.is_file() and not checkpoint.is_pickle(path):
            family = detect_family(checkpoint.read_shapes(path), path.name)
            unet, vae = family.config("unet"), family.config("vae")
        else:
            return None
        size = unet["sample_size"]
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (ModelError, OSError, ValueError, KeyError, TypeError):
        return None


def load_sd_model(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    prediction: str = "auto",
    vae: str | Path | None = None,
    loras: list[tuple[Path, float]] | None = None,
    unet_dtype: torch.dtype | None = None,
) -> SDModel:
    """Load a diffusers folder or single-file checkpoint; ``prediction`` overrides the detected type.

    ``unet_dtype`` loads the U-Net directly in the run's precision (no fp32 copy in memory).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        model = _load_folder(path, allow_pickle, unet_dtype)
    elif path.is_file():
        model = _load_single_file(path, allow_pickle, unet_dtype)
    else:
        raise ModelError(f"model {path} does not exist", "pass a checkpoint file or a diffusers model folder")
    if prediction != "auto":
        model.scheduler_config["prediction_type"] = PREDICTIONS[prediction]
    if vae is not None:
        model.vae = load_vae(Path(vae).expanduser(), model.family, allow_pickle)
        model.vae_name = Path(vae).stem
    for lora_path, weight in loras or []:
        from difftool.plugins.builtin.sd.lora import apply_lora

        apply_lora(model, lora_path, weight, allow_pickle=allow_pickle)
    _check_finite(model)
    return model


def _load_folder(path: Path, allow_pickle: bool, unet_dtype: torch.dtype | None = None) -> SDModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config_path = path / "unet" / "config.json"
    if not config_path.is_file():
        raise ModelError(
            f"{path} is not a Stable Diffusion model folder (no unet/config.json)",
            "pass a diffusers model folder or a .safetensors checkpoint",
        )
    try:
        unet_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_path} cannot be read: {_first_line(exc)}", "restore the model's config") from None
    family = family_from_unet_config(unet_config, path)
    kwargs = _folder_weight_kwargs(path, allow_pickle)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=unet_dtype, **kwargs)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs)
        encoders = [_load_text_encoder(path / name, name, kwargs) for name in family.text_encoders]
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load the model folder {path}: {_first_line(exc)}", "check its weights") from exc
    tokenizers = [
        _folder_tokenizer(path, name.replace("text_encoder", "tokenizer"), kind)
        for name, kind in zip(family.text_encoders, family.tokenizers, strict=True)
    ]
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json") or family.config("scheduler")
    weights = next(iter(sorted((path / "unet").glob("diffusion_pytorch_model*"))), None)
    digest = file_sha256(weights) if weights is not None else ""
    return SDModel(path, family, unet, vae, encoders, tokenizers, scheduler_config, digest)


def _folder_weight_kwargs(path: Path, allow_pickle: bool) -> dict[str, Any]:
    safetensors = any((path / "unet").glob("*.safetensors"))
    if not safetensors and not allow_pickle:
        raise ModelError(
            f"{path} holds only pickle (.bin) weights, which can run code when loaded",
            "convert them to safetensors, or pass --allow-pickle if you trust the source",
        )
    for weights in path.glob("*/*.safetensors"):
        check_safetensors(weights)
    # With both present, diffusers reads only the safetensors files when asked to.
    return {"local_files_only": True, "use_safetensors": True if safetensors else None}


def _load_text_encoder(folder: Path, name: str, kwargs: dict[str, Any]) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    return cls.from_pretrained(folder, local_files_only=True, use_safetensors=kwargs["use_safetensors"])


def _folder_tokenizer(path: Path, name: str, kind: str) -> Any:
    folder = path / name
    if (folder / "tokenizer_config.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    return clip_tokenizer(kind)


def _load_single_file(path: Path, allow_pickle: bool, unet_dtype: torch.dtype | None = None) -> SDModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    state = checkpoint.load_state_dict(path, allow_pickle=allow_pickle)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    if sidecar.is_dir():
        family = family_from_unet_config(json.loads((sidecar / "unet" / "config.json").read_text()), sidecar)
        config_dir = sidecar
    else:
        family = detect_family(shapes, path.name)
        config_dir = family.config_dir
    kwargs = {"config": str(config_dir), "local_files_only": True}
    try:
        unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", torch_dtype=unet_dtype, **kwargs)
        vae = AutoencoderKL.from_single_file(state, subfolder="vae", **kwargs)
        encoders = [_single_file_text_encoder(state, name, config_dir) for name in family.text_encoders]
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(
            f"{path.name} does not match the {family.label} architecture: {_first_line(exc)}", fix_for(shapes)
        ) from exc
    scheduler_config = _read_json(config_dir / "scheduler" / "scheduler_config.json") or family.config("scheduler")
    parameterization = _sidecar_parameterization(path)
    if parameterization:
        scheduler_config["prediction_type"] = parameterization
    tokenizers = [clip_tokenizer(kind) for kind in family.tokenizers]
    del state
    return SDModel(path, family, unet, vae, encoders, tokenizers, scheduler_config, file_sha256(path))


def _single_file_text_encoder(state: dict[str, torch.Tensor], name: str, config_dir: Path) -> Any:
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    return create_diffusers_clip_model_from_ldm(
        cls, state, subfolder=name, config=str(config_dir), local_files_only=True
    )


def _sidecar_parameterization(path: Path) -> str | None:
    """A1111 convention: ``model.yaml`` beside ``model.safetensors`` with ``parameterization: "v"``."""
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    match = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", yaml.read_text(errors="replace"), re.MULTILINE)
    return PREDICTIONS.get(match.group(1)) if match else "epsilon"


def load_vae(path: Path, family: Family, allow_pickle: bool) -> Any:
    """A standalone VAE: a diffusers ``vae`` folder, or a file in the original or diffusers key layout."""
    from diffusers import AutoencoderKL

    if path.is_dir():
        return AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=not allow_pickle)
    state = checkpoint.load_state_dict(path, allow_pickle=allow_pickle)
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
        vae = AutoencoderKL.from_config(family.config("vae"))
        _load_exact(vae, state, path.name)
        return vae
    if not any(k.startswith(("encoder.down.", "first_stage_model.")) for k in state):
        raise ModelError(f"{path.name} is not a VAE", "pass a VAE .safetensors file or folder to --vae")
    return AutoencoderKL.from_single_file(state, config=str(family.config_dir), subfolder="vae", local_files_only=True)


def _load_exact(module: Any, state: dict[str, Any], what: str) -> None:
    own = module.state_dict()
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise ModelError(
                f"{what}: weight {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}",
                "pass weights made for this model family",
            )
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise ModelError(f"{what}: weight {name} is {'missing' if missing else 'unexpected'}", "check the file")


def _check_finite(model: SDModel) -> None:
    import torch

    for part, module in (("unet", model.unet), ("vae", model.vae), *(("text encoder", t) for t in model.text_encoders)):
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ModelError(f"{model.name}: {part} weight {name} contains NaN or Inf", "use an intact copy")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
