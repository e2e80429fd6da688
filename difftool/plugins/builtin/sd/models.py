"""Which Stable Diffusion model a run uses: ``--model`` resolution, load options, and a one-model cache."""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Any

from difftool.core import phases
from difftool.core.errors import ModelError, ParameterError
from difftool.core.models import ModelRef, model_path
from difftool.core.params import Params
from difftool.core.runtime import current
from difftool.core.task import Param, RunContext
from difftool.plugins.builtin.sd.loader import SDModel, is_sd_model, load_sd_model, native_size
from difftool.plugins.builtin.sd.lora import LORA_FAMILIES, Loras, _is_number, parse_lora

#: Parameters every Stable Diffusion task declares for loading its model.
LOAD_PARAMS = (
    Param("vae", "path", help="a VAE file or folder to use instead of the checkpoint's"),
    Param(
        "lora",
        "string",
        help="LoRA files or listed names, comma-separated, each PATH[:WEIGHT] (weight default 1)",
        parse=parse_lora,
    ),
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
    """The file or folder ``--model`` names (resolved by the preflight: a path, or a name ``difftool models``
    lists)."""
    if not model:
        raise ModelError(
            "this task needs a Stable Diffusion model", "pass --model PATH or a name from `difftool models`"
        )
    return model_path(model, context.registry)


def is_sd_request(model: str | None, context: RunContext) -> bool:
    """Whether ``--model`` names a Stable Diffusion model (tasks that also run difftool's own models ask)."""
    if not model:
        return False
    return is_sd_model(resolve_path(model, context))


def delegated_family(context: RunContext, task: str) -> Any:
    """A family plugin (``register_families``: SD3, Flux, a third party's) that runs ``task`` for ``--model``,
    or ``None`` when Stable Diffusion runs it here."""
    if not context.model:
        return None
    return context.registry.family_for(resolve_path(context.model, context), task)


def native_size_of(model: str | None) -> int:
    """The native resolution of ``--model`` (resolved by the preflight) without loading its weights: a side
    ``export_shapes`` defaults to, as the run does (SDXL: 1024); 512 when only loading would tell."""
    if not model:
        return 512
    path = model.path if isinstance(model, ModelRef) else Path(model).expanduser()
    return native_size(path) or 512


def lora_files(loras: Loras | None) -> list[tuple[Path, float]]:
    """The (file, weight) pairs of ``--lora`` (resolved by the preflight), each checked to be a file."""
    found = []
    for spec in parse_lora(loras or "").specs:
        if not spec.path.is_file():
            raise ParameterError(
                f"LoRA file {spec.name} does not exist", "pass --lora PATH[:WEIGHT] with an existing file"
            )
        found.append((spec.path, spec.weight))
    return found


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
    loras = []
    for name, weight in split_loras(prompt)[1]:
        path = None
        with contextlib.suppress(ModelError):  # a tag names a listed LoRA, never a path
            path = context.registry.resolve_model(name, LORA_FAMILIES, what="LoRA", paths=False)
        if path is None:
            raise ParameterError(
                f"the prompt names LoRA {name!r}, which is not in the model roots' Lora folders",
                f"put {name}.safetensors in models/Lora under a model root (`difftool models` lists them) "
                "or pass --lora PATH",
            )
        loras.append((path, weight))
    return loras


def sd_model_for(context: RunContext, params: Params) -> SDModel:
    """Load (or reuse) the model a run asked for with its VAE and LoRA options."""
    path = resolve_path(context.model, context)
    loras = lora_files(params.lora) + prompt_loras(params.prompt, context)
    model = cached_model(path, loras, params, context)
    if model.family.refiner:
        raise ModelError(
            f"{model.name} is an SDXL refiner, which only finishes another model's image",
            "pass an SDXL base as --model and this one as --refiner",
        )
    return model


def cached_model(
    path: Path, loras: list[tuple[Path, float]], params: Params, context: RunContext, cache_name: str = ""
) -> SDModel:
    """Load (or reuse) the model at ``path``; ``cache_name`` keeps it beside the run's model (a refiner)."""
    vae = params.vae
    key = (
        str(path.resolve()),
        path.stat().st_mtime_ns,
        params.allow_pickle,
        params.prediction,
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
            allow_pickle=params.allow_pickle,
            prediction=params.prediction,
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
