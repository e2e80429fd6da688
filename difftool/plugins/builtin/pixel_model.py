"""difftool's pixel-space image-to-image models (superres, inpaint): folder layout, load, save.

A model folder is a diffusers ``UNet2DModel`` folder plus two small files::

    config.json                            UNet2DModel config (diffusers)
    diffusion_pytorch_model.safetensors    weights (fp16 or fp32)
    scheduler_config.json                  training noise schedule, incl. prediction_type
    difftool.json                          {"task": "superres", "target": "residual", "steps": 4, ...}

``target`` is ``image`` (the sample is the clean image) or ``residual`` (the sample is the clean image
minus the conditioning image, superres' bicubic upsample). ``config.json`` names the network class
(``_class_name``): a diffusers ``UNet2DModel`` or difftool's :class:`~difftool.plugins.builtin.srnet.SRNet`.

A folder may instead hold one model folder per variant (superres: one network per scale)::

    difftool.json    {"task": "superres", "variants": {"2": "x2", "4": "x4"}, "default_variant": "4"}
    x2/  x4/         model folders as above

The embedded defaults live in ``difftool/models/<task>/`` inside the package.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftool.core import phases
from difftool.core.atomic import file_sha256, replace_dir
from difftool.core.errors import ModelError
from difftool.core.models import ModelResolver, model_path
from difftool.core.runtime import current
from difftool.core.safetensors_check import check_safetensors

if TYPE_CHECKING:
    import torch

META_FILE = "difftool.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
EMBEDDED_ROOT = Path(__file__).resolve().parents[2] / "models"


@dataclass
class PixelModel:
    """A loaded pixel-space model and what a task needs to know to run it."""

    path: Path
    meta: dict[str, Any]
    scheduler_config: dict[str, Any]
    unet: torch.nn.Module
    sha256: str

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.path.name

    @property
    def multiple(self) -> int:
        """Height and width must be multiples of this (the U-Net's total downsampling, SRNet's scale)."""
        return network_multiple(self.unet)


def network_multiple(module: Any) -> int:
    """What a pixel model's input height and width must be multiples of."""
    if hasattr(module, "multiple"):
        return int(module.multiple)
    return 2 ** (len(module.config.down_block_types) - 1)


#: config.json ``_class_name`` -> the class that loads it (imported lazily: diffusers is slow to import).
NETWORK_CLASSES = {
    "UNet2DModel": "diffusers:UNet2DModel",
    "SRNet": "difftool.plugins.builtin.srnet:SRNet",
    "InpaintNet": "difftool.plugins.builtin.inpaintnet:InpaintNet",
}


def embedded_model_path(task: str) -> Path | None:
    path = EMBEDDED_ROOT / task
    return path if (path / META_FILE).is_file() else None


def resolve_model(task: str, model: str | None, registry: ModelResolver | None = None) -> Path:
    """The folder for ``--model`` (resolved by the preflight: a path, or a name ``difftool models`` lists), or
    the embedded one."""
    if model is None:
        embedded = embedded_model_path(task)
        if embedded is None:
            raise ModelError(
                f"this install has no embedded {task} model",
                f"pass --model PATH to a difftool {task} model folder (see `difftool train {task}`)",
            )
        return embedded
    return model_path(model, registry)


def availability(task: Any, model: str | None) -> str | None:
    """``Task.availability`` for tasks that run a pixel model: ready when given one or one is embedded."""
    if model is None and embedded_model_path(task.name) is None:
        return f"no embedded {task.name} model in this install; pass --model PATH"
    return None


def model_for(task: str, context: Any, variant: str | None = None) -> PixelModel:
    """The model a run asked for (``context.model``) or the embedded one, loaded and checked."""
    model = load_pixel_model(resolve_model(task, context.model, context.registry), task, variant)
    context.cancel.raise_if_cancelled()  # cancelled while loading: stop before any work
    return model


def _loaded() -> dict[tuple[str, int], PixelModel]:
    """Loaded models, kept in the process's runtime (one at a time)."""
    return current().cache("pixel-models", dict)


def load_pixel_model(path: Path, task: str, variant: str | None = None) -> PixelModel:
    """Load and check a model folder for ``task``; one model stays cached for batch runs.

    For a folder of variants, ``variant`` picks one (``None``: the folder's default); a plain model
    folder ignores it (the task checks that the model fits the request).
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path} is not a model folder", f"pass the folder that holds {META_FILE} and config.json")
    meta_path, weights = path / META_FILE, path / WEIGHTS_FILE
    if not meta_path.is_file():
        raise ModelError(f"{path} has no {META_FILE}", f"pass a difftool {task} model folder")
    meta = _read_json(meta_path)
    if not isinstance(meta, dict):
        raise ModelError(f"{meta_path} is not a JSON object", f"restore the model folder's {META_FILE}")
    if meta.get("task") != task:
        raise ModelError(
            f"{path} is a model for {meta.get('task')!r}, not {task!r}", f"pass a {task} model to this task"
        )
    variants = meta.get("variants")
    if variants is not None and not (
        isinstance(variants, dict) and all(isinstance(v, str) for v in [*variants, *variants.values()])
    ):
        raise ModelError(f"{meta_path}: 'variants' must map names to sub-folders", f"fix the model's {META_FILE}")
    if variants:
        choice = str(variant) if variant is not None else str(meta.get("default_variant", next(iter(variants))))
        if choice not in variants:
            raise ModelError(
                f"model {meta.get('name') or path.name} has no variant {choice} (it has {', '.join(variants)})",
                "pick one of those",
            )
        sub = (path / variants[choice]).resolve()
        if path.resolve() not in sub.parents:
            raise ModelError(f"{path}: variant {choice} points outside the model folder", "fix its difftool.json")
        return load_pixel_model(sub, task)
    if not weights.is_file():
        hint = " (only pickle .bin weights, which difftool does not load)" if any(path.glob("*.bin")) else ""
        raise ModelError(f"{path} has no {WEIGHTS_FILE}{hint}", "save the weights as safetensors")
    key = (str(weights.resolve()), weights.stat().st_mtime_ns)
    cache = _loaded()
    if key in cache:
        return cache[key]
    check_safetensors(weights)
    phases.announce(f"loading model {meta.get('name') or path.name}")
    network = network_class(path)
    try:
        unet = network.from_pretrained(path, use_safetensors=True, local_files_only=True)
    except Exception as exc:  # diffusers raises several types for a bad folder; we name the folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load the model in {path}: {first}", "check that its weights match config.json"
        ) from exc
    import torch

    for name, tensor in unet.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"{path}: weight {name} contains NaN or Inf", "re-export or re-download the model")
    scheduler_config = _read_json(path / "scheduler_config.json")
    loaded = PixelModel(path, meta, scheduler_config, unet.float().eval(), file_sha256(weights))
    cache.clear()
    cache[key] = loaded
    return loaded


def _read_json(path: Path) -> Any:
    """A model folder's JSON file; a :class:`ModelError` naming the file when it is missing or invalid."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path.parent} has no {path.name}", f"restore the model folder's {path.name}") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})", f"restore the model folder's {path.name}") from None


def network_class(path: Path) -> Any:
    import importlib

    config = _read_json(path / "config.json")
    name = config.get("_class_name", "UNet2DModel") if isinstance(config, dict) else None
    if name not in NETWORK_CLASSES:
        raise ModelError(
            f"{path}: network class {name!r} is not a difftool pixel model", f"use one of {', '.join(NETWORK_CLASSES)}"
        )
    module, _, attr = NETWORK_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def save_pixel_model(
    unet: torch.nn.Module,
    path: str | os.PathLike[str],
    meta: dict[str, Any],
    scheduler_config: dict[str, Any],
    fp16: bool = True,
) -> Path:
    """Write a model folder atomically (built in a temp folder, then renamed into place)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        module = unet.half() if fp16 else unet
        module.save_pretrained(tmp, safe_serialization=True)
        if fp16:
            unet.float()
        (tmp / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2, sort_keys=True))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        _normal_permissions(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _normal_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders (and some writers 0600 files): give a model folder what mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# --- running ---------------------------------------------------------------------------------------


def to_tensor(rgb: Any) -> torch.Tensor:
    """H x W x C float [0, 1] numpy -> 1 x C x H x W torch in [-1, 1]."""
    import torch

    array = rgb if rgb.ndim == 3 else rgb[..., None]
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() * 2 - 1


def to_numpy(x: torch.Tensor) -> Any:
    """1 x C x H x W in [-1, 1] -> H x W x C float32 numpy in [0, 1]."""
    return ((x[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()


def upsample(low: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic upsample of a [-1, 1] batch: superres' conditioning, in training and inference alike."""
    import torch.nn.functional as F

    return F.interpolate(low, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)


def export_target(task_name: str, model: str | None) -> Any:
    """What ``difftool export FORMAT TASK`` exports: the pixel model's U-Net (embedded by default), or a
    Stable Diffusion checkpoint's U-Net when ``model`` is one (loaded in fp32: exports are keyed by it)."""
    from difftool.core.exporter import ExportTarget
    from difftool.plugins.builtin.sd.loader import is_sd_model, load_sd_model

    if model and is_sd_model(Path(model).expanduser()):
        sd = load_sd_model(model)
        return ExportTarget(sd.unet, sd.unet_id, sd.prediction_type)
    loaded = load_pixel_model(resolve_model(task_name, model), task_name)
    return ExportTarget(loaded.unet, loaded.sha256, loaded.scheduler_config.get("prediction_type", "epsilon"))


def make_denoiser(model: PixelModel, context: Any, shapes: Any = None) -> Any:
    return context.make_denoiser(
        model.unet,
        prediction_type=model.scheduler_config.get("prediction_type", "epsilon"),
        model_id=model.sha256,
        shapes=shapes,
    )


def denoise(
    model: PixelModel,
    denoiser: Any,
    *,
    cond: torch.Tensor,
    steps: int | None,
    scheduler: str | None,
    context: Any,
    base: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    extra: dict[str, Any] | None = None,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Sample a 3-channel image conditioned on ``cond`` (concatenated channels), same H x W as ``cond``.

    Pads H and W up to the U-Net's multiple by reflection and crops back. For ``residual`` models the
    result is ``base + sample``. ``noise`` (same H x W) makes tiles share one noise field; ``extra``
    is passed through as conditioning (``class_labels``). ``init`` with ``strength`` < 1 starts from
    that image noised part-way (img2img) instead of from pure noise.
    """
    import torch
    import torch.nn.functional as F

    from difftool.core.sampler import make_noise, sample

    height, width = cond.shape[-2:]
    m = model.multiple
    pad_h, pad_w = (-height) % m, (-width) % m
    if pad_h or pad_w:
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        cond = F.pad(cond, (0, pad_w, 0, pad_h), mode=mode)
    shape = (cond.shape[0], denoiser.sample_channels, *cond.shape[-2:])
    if noise is None:
        noise = make_noise(shape, context, denoiser.device, torch.float32)
    elif pad_h or pad_w:
        noise = F.pad(noise, (0, pad_w, 0, pad_h), mode="replicate")
    if init is not None and (pad_h or pad_w):
        init = F.pad(init, (0, pad_w, 0, pad_h), mode="replicate")
    sched = context.make_scheduler(scheduler or model.meta.get("scheduler", "ddim"), model.scheduler_config)
    cond = cond.to(denoiser.device, denoiser.dtype)
    residual = model.meta.get("target") == "residual"

    def preview(x0: torch.Tensor) -> Any:
        from difftool.core.images import to_pil

        shown = x0[..., :height, :width].float().cpu()
        if residual and base is not None:
            shown = shown + base
        return to_pil(to_numpy(shown))

    out = sample(
        denoiser,
        sched,
        steps=steps or int(model.meta.get("steps", 4)),
        context=context,
        shape=shape,
        cond={"concat": cond, **(extra or {})},
        noise=noise.to(denoiser.device),
        decode_preview=preview,
        init=init,
        strength=strength,
    )
    out = out[..., :height, :width].float().cpu()
    if residual:
        if base is None:
            raise ValueError("a residual model needs the base image")
        out = base + out
    return out.clamp(-1, 1)


def model_record(model: PixelModel) -> dict[str, Any]:
    return {"model": model.name, "model_hash": model.sha256[:10]}
