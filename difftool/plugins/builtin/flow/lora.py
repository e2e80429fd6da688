"""LoRAs for SD3 and Flux, merged into a loaded model's weights, as the SD plugin does for U-Nets.

diffusers' ``FluxLoraLoaderMixin`` / ``SD3LoraLoaderMixin`` read the layouts people download and convert
them (Flux: kohya / sd-scripts ``lora_unet_double_blocks_*``, XLabs, BFL, diffusers / peft; SD3:
diffusers / peft, plus kohya's layout through :mod:`sd3_lora`); difftool loads the file, lets a
pipeline view over the model's own modules attach it, fuses it into the weights and drops the adapter,
so a step costs what it cost without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difftool.core.atomic import file_sha256
from difftool.core.errors import ModelError
from difftool.plugins.builtin.flow import sd3_lora
from difftool.plugins.builtin.flow.gguf_files import is_quantised
from difftool.plugins.builtin.flow.loader import FlowModel
from difftool.plugins.builtin.sd import checkpoint


def apply_lora(model: FlowModel, path: Path, weight: float) -> None:
    """Merge the LoRA at ``path`` into ``model``'s transformer (and text encoders, where it has them)."""
    if is_quantised(model.transformer) or getattr(model.transformer, "_difftool_storage_dtype", None) is not None:
        raise ModelError(
            f"LoRAs cannot be merged into {model.name}'s fp8 / GGUF weights yet",
            "use the model's bf16 / fp16 file with --lora, or drop the LoRA",
        )
    state = checkpoint.load_state_dict(path)
    if not any("lora" in key or ".processor." in key for key in state):  # XLabs names its layers processors
        raise ModelError(f"{path.name} is not a LoRA (no lora weights in it)", "pass a LoRA file to --lora")
    if model.family.arch == "sd3" and sd3_lora.is_kohya_sd3(state):  # diffusers' SD3 loader reads peft only
        state = sd3_lora.to_peft(state, int(model.transformer.config.num_layers))
    pipe = _pipeline_view(model)
    adapter = f"lora{len(model.loras)}"
    try:
        pipe.load_lora_weights(state, adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError, AttributeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"LoRA {path.name} does not fit {model.name}: {detail}", f"pass a LoRA made for {model.family.label}"
        ) from exc
    if not any(adapter in names for names in pipe.get_list_adapters().values()):
        raise ModelError(f"LoRA {path.name} changes nothing in {model.name}", f"pass a LoRA for {model.family.label}")
    # Every part the LoRA changed: Flux's fuse_lora fuses only the transformer unless told (the text encoder's
    # part would be dropped with the adapter).
    pipe.fuse_lora(components=list(pipe._lora_loadable_modules), lora_scale=weight, adapter_names=[adapter])
    pipe.unload_lora_weights()  # after fusing: the adapter layers go, the merged weights stay
    model.loras.append((path.stem, weight, file_sha256(path)))


def _pipeline_view(model: FlowModel) -> Any:
    """A diffusers pipeline over the model's own modules (no copies), for its LoRA loader."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    config = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    common = {
        "transformer": model.transformer,
        "vae": model.vae,
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(config),
        "text_encoder": model.encoders["clip_l"],
        "tokenizer": model.tokenizers["clip_l"],
    }
    if model.family.arch == "flux":
        return FluxPipeline(**common, text_encoder_2=model.encoders["t5"], tokenizer_2=model.tokenizers["t5"])
    return StableDiffusion3Pipeline(
        **common,
        text_encoder_2=model.encoders["clip_g"],
        tokenizer_2=model.tokenizers["clip_g"],
        text_encoder_3=model.encoders.get("t5"),  # SD3 runs without T5
        tokenizer_3=model.tokenizers["t5"],
    )
