"""LoRA files (kohya / A1111 and diffusers / peft formats), merged into a loaded model's weights.

diffusers' ``load_lora_weights`` reads both formats (and converts kohya's key names); difftool loads
the file itself (safetensors, or a pickle only with ``--allow-pickle``), lets diffusers attach it,
then fuses it into the weights and drops the adapter, so every backend and exporter sees plain
modules and a step costs what it cost without the LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftool.core.atomic import file_sha256
from difftool.core.errors import ModelError, ParameterError
from difftool.core.models import ModelRef
from difftool.core.params import Resolver
from difftool.plugins.builtin.sd import checkpoint

#: The family ``difftool models`` gives LoRA files.
LORA_FAMILIES = ("lora",)


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora`` item: a LoRA file or listed name (a :class:`ModelRef` once resolved) and its weight."""

    name: str
    weight: float = 1.0

    @property
    def path(self) -> Path:
        """The file (after the preflight resolved it)."""
        return self.name.path if isinstance(self.name, ModelRef) else Path(self.name).expanduser()


class Loras(str):
    """``--lora``'s parsed value: the specs (:attr:`specs`) and, as text, their canonical spelling
    (:func:`format_lora`), which records and metadata show as before."""

    specs: tuple[LoraSpec, ...]

    def __new__(cls, specs: tuple[LoraSpec, ...]) -> Loras:
        value = super().__new__(cls, format_lora(specs))
        value.specs = tuple(specs)
        return value

    def __reduce__(self) -> tuple[object, ...]:  # picklable for Ray and worker processes
        return (Loras, (self.specs,))

    def resolved(self, resolver: Resolver) -> Loras:
        """Each name resolved to its file (a path, or a name listed with the ``lora`` family)."""
        return Loras(tuple(LoraSpec(resolver.model(s.name, LORA_FAMILIES, "LoRA"), s.weight) for s in self.specs))


def parse_lora(value: Any) -> Loras:
    """``a.safetensors:0.7,b`` -> specs (weight default 1); the one parser of ``--lora`` (CLI, API, server, GUI)."""
    if isinstance(value, Loras):
        return value
    if not isinstance(value, (str, Path)):
        raise ParameterError(f"--lora {str(value)[:80]!r} is not LoRA text", "pass --lora NAME[:WEIGHT],...")
    specs = []
    for item in str(value).split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, weight = item.rpartition(":")
        if not sep or not _is_number(weight):
            name, weight = item, "1"
        elif not math.isfinite(float(weight)):
            raise ParameterError(f"--lora {item}: weight {weight} is not a finite number", f"write --lora {name}:0.8")
        specs.append(LoraSpec(name, float(weight)))
    return Loras(tuple(specs))


def format_lora(specs: tuple[LoraSpec, ...]) -> str:
    """The text :func:`parse_lora` reads back: ``NAME[:WEIGHT]`` (the weight when not 1), comma-separated."""
    return ",".join(s.name if s.weight == 1.0 else f"{s.name}:{s.weight:g}" for s in specs)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_lora(model: Any, path: Path, weight: float, *, allow_pickle: bool = False) -> None:
    """Merge the LoRA at ``path`` into ``model`` (an :class:`~difftool.plugins.builtin.sd.loader.SDModel`)."""
    state = checkpoint.load_state_dict(path, allow_pickle=allow_pickle)
    if not any("lora" in key for key in state):
        raise ModelError(f"{path.name} is not a LoRA (no lora weights in it)", "pass a LoRA file to --lora")
    pipe = _pipeline_view(model)
    adapter = f"lora{len(model.loras)}"
    try:
        pipe.load_lora_weights(state, adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"LoRA {path.name} does not fit {model.name}: {detail}", f"pass a LoRA made for {model.family.label}"
        ) from exc
    except ImportError as exc:
        raise ModelError("LoRA support needs the peft package", "pip install 'difftool[sd]'") from exc
    pipe.fuse_lora(lora_scale=weight, adapter_names=[adapter])
    pipe.unload_lora_weights()  # after fusing, this drops the adapter layers and keeps the merged weights
    model.loras.append((path.stem, weight, file_sha256(path)))
    from difftool.exporters.onnx import LORA_BASE

    # exporters keep one export per checkpoint for its LoRA combinations (not one per combination)
    setattr(model.unet, LORA_BASE, model.sha256)


def _pipeline_view(model: Any) -> Any:
    """A diffusers pipeline over the model's own modules (no copies), for its LoRA loader."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    common = {
        "vae": model.vae,
        "unet": model.unet,
        "text_encoder": model.text_encoders[0],
        "tokenizer": model.tokenizers[0],
        "scheduler": _any_scheduler(model),
    }
    if model.family.xl:
        return StableDiffusionXLPipeline(
            **common, text_encoder_2=model.text_encoders[1], tokenizer_2=model.tokenizers[1]
        )
    return StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _any_scheduler(model: Any) -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(model.scheduler_config)
