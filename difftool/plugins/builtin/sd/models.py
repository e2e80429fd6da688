"""Which Stable Diffusion model a run uses: ``--model`` resolution, load options, and a one-model cache."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from difftool.core import phases
from difftool.core.errors import ModelError, ParameterError
from difftool.core.runtime import current
from difftool.core.task import Param, RunContext
from difftool.plugins.builtin.sd.loader import SDModel, is_sd_model, load_sd_model

#: Parameters every Stable Diffusion task declares for loading its model.
LOAD_PARAMS = (
    Param("vae", "path", help="a VAE file or folder to use instead of the checkpoint's"),
    Param("lora", "string", help="LoRA files, comma-separated, each PATH[:WEIGHT] (weight default 1)"),
    Param(
        "prediction",
        "choice",
        default="auto",
        choices=("auto", "epsilon", "v"),
        help="what the U-Net predicts; auto: from the model (SD 2.x single files: v, or a .yaml beside it)",
    ),
    Param("allow_pickle", "bool", default=False, help="load .ckpt/.bin pickle files (only from trusted sources)"),
)


def _loaded(cache_name: str = "") -> dict[tuple[Any, ...], SDModel]:
    """Loaded models, kept in the process's runtime (one at a time per ``cache_name``)."""
    return current().cache("sd-models" + cache_name, dict)


def resolve_path(model: str | None, context: RunContext) -> Path:
    """The file or folder that ``--model`` names: a path, or a name that ``difftool models`` lists."""
    if not model:
        raise ModelError(
            "this task needs a Stable Diffusion model", "pass --model PATH or a name from `difftool models`"
        )
    path = Path(model).expanduser()
    if path.exists():
        return path
    for entry in context.registry.find_models():
        if entry.name == model:
            return entry.path
    raise ModelError(f"model {model!r} not found", "pass a checkpoint path or a name listed by `difftool models`")


def is_sd_request(model: str | None, context: RunContext) -> bool:
    """Whether ``--model`` names a Stable Diffusion model (tasks that also run difftool's own models ask)."""
    if not model:
        return False
    return is_sd_model(resolve_path(model, context))


def parse_loras(spec: str | None) -> list[tuple[Path, float]]:
    """``a.safetensors:0.7,b.safetensors`` -> [(path, 0.7), (path, 1.0)]."""
    loras = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        path, sep, weight = item.rpartition(":")
        if not sep or not _is_number(weight):
            path, weight = item, "1"
        elif not math.isfinite(float(weight)):
            raise ParameterError(f"--lora {item}: weight {weight} is not a finite number", f"write --lora {path}:0.8")
        lora = Path(path).expanduser()
        if not lora.is_file():
            raise ParameterError(f"LoRA file {path} does not exist", "pass --lora PATH[:WEIGHT] with an existing file")
        loras.append((lora, float(weight)))
    return loras


#: A1111's extra-network tag for LoRAs: ``<lora:NAME>`` or ``<lora:NAME:WEIGHT>`` (a third field, A1111's
#: separate U-Net weight, is accepted and ignored: difftool fuses one weight into both).
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


def split_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """``"a cat <lora:ink:0.8>"`` -> ``("a cat ", [("ink", 0.8)])``: the prompt without its LoRA tags."""
    found = []
    for name, weight in _LORA_TAG.findall(prompt):
        if weight and not _is_number(weight):
            raise ParameterError(f"<lora:{name}:{weight}> has no numeric weight", f"write <lora:{name}:0.8>")
        if weight and not math.isfinite(float(weight)):
            raise ParameterError(
                f"<lora:{name}:{weight}>: the weight is not a finite number", f"write <lora:{name}:0.8>"
            )
        found.append((name.strip(), float(weight) if weight else 1.0))
    return _LORA_TAG.sub("", prompt), found


def prompt_loras(prompt: str, context: RunContext) -> list[tuple[Path, float]]:
    """The LoRAs a prompt's ``<lora:NAME:WEIGHT>`` tags name, found by name in the model roots (as ``--lora``)."""
    named = split_loras(prompt)[1]
    if not named:
        return []
    listed = {e.name: e.path for e in context.registry.find_models() if e.family == "lora"}
    loras = []
    for name, weight in named:
        if name not in listed:
            raise ParameterError(
                f"the prompt names LoRA {name!r}, which is not in the model roots' Lora folders",
                f"put {name}.safetensors in models/Lora under a model root (`difftool models` lists them) "
                "or pass --lora PATH",
            )
        loras.append((listed[name], weight))
    return loras


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def sd_model_for(context: RunContext, params: dict[str, Any]) -> SDModel:
    """Load (or reuse) the model a run asked for with its VAE and LoRA options."""
    path = resolve_path(context.model, context)
    loras = parse_loras(params.get("lora")) + prompt_loras(params.get("prompt") or "", context)
    model = cached_model(path, loras, params, context)
    if model.family.refiner:
        raise ModelError(
            f"{model.name} is an SDXL refiner, which only finishes another model's image",
            "pass an SDXL base as --model and this one as --refiner",
        )
    return model


def cached_model(
    path: Path, loras: list[tuple[Path, float]], params: dict[str, Any], context: RunContext, cache_name: str = ""
) -> SDModel:
    """Load (or reuse) the model at ``path``; ``cache_name`` keeps it beside the run's model (a refiner)."""
    vae = params.get("vae")
    key = (
        str(path.resolve()),
        path.stat().st_mtime_ns,
        bool(params.get("allow_pickle")),
        params.get("prediction") or "auto",
        str(vae),
        tuple((str(p), w, p.stat().st_mtime_ns) for p, w in loras),
        context.dtype,  # the U-Net loads in the run's precision; the VAE and text encoders are cast in place
        context.backend_name,
        context.device,  # ... and moved in place: a model on one device is never handed to a run on another
    )
    cache = _loaded(cache_name)
    if key not in cache:
        cache.clear()  # one model at a time: they are gigabytes
        phases.announce(f"loading model {path.name}")
        cache[key] = load_sd_model(
            path,
            allow_pickle=bool(params.get("allow_pickle")),
            prediction=params.get("prediction") or "auto",
            vae=vae,
            loras=loras,
            # Exporting backends take fp32 weights: an export keyed by the checkpoint must not see rounded ones.
            unet_dtype=context.torch_dtype if context.backend_name == "torch" else None,
        )
        if context.backend_name == "torch" and context.device != "cpu":
            # Once, at load (this cache is keyed by the device): TorchDenoiser would otherwise copy gigabytes
            # to the GPU for every image of a folder job.
            import torch

            torch.nn.Module.to(cache[key].unet, device=context.torch_device)
    context.cancel.raise_if_cancelled()  # cancelled while loading: stop before any work
    return cache[key]
