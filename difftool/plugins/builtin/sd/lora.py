"""LoRA files (kohya / A1111 and diffusers / peft formats), merged into a loaded model's weights.

diffusers' ``load_lora_weights`` reads both formats (and converts kohya's key names); difftool loads
the file itself (safetensors, or a pickle only with ``--allow-pickle``), lets diffusers attach it,
then fuses it into the weights and drops the adapter, so every backend and exporter sees plain
modules and a step costs what it cost without the LoRA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difftool.core.atomic import file_sha256
from difftool.core.errors import ModelError
from difftool.plugins.builtin.sd import checkpoint


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
