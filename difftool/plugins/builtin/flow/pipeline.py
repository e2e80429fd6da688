"""Text conditioning, sampling and decoding for SD3 and Flux, step for step as diffusers'
StableDiffusion3Pipeline and FluxPipeline do it, so the same weights, seed and steps give the same image.

Low-memory mode (``--backend-opt offload=model``): the text encoders are freed once the prompts are
encoded, and the transformer and the VAE each sit on the GPU only while they run (diffusers'
``enable_model_cpu_offload``, done here by phase: encode, sample, decode).

Prompts: CLIP reads 77 tokens (the rest is dropped, as in diffusers), T5 ``max_sequence_length`` tokens
(SD3 and Flux schnell: 256, Flux dev: 512). SD3 runs classifier-free guidance through the core sampler
(negative prompt batch); Flux dev takes ``guidance_scale`` as its distilled-guidance input, one batch, and
``--true-cfg`` adds FluxPipeline's true CFG (a negative prompt batch) on top.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from difftool.core.errors import ModelError, ParameterError
from difftool.core.task import RunContext
from difftool.plugins.builtin.flow.loader import FlowModel

if TYPE_CHECKING:
    import torch

CLIP_LENGTH = 77


def t5_length(model: FlowModel) -> int:
    return 512 if model.family.name in ("flux", "flux-fill") else 256


@dataclass
class Conditioning:
    cond: dict[str, Any]
    uncond: dict[str, Any] | None
    guidance_scale: float


def _ids(tokenizer: Any, text: str, length: int) -> torch.Tensor:
    return tokenizer([text], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def _clip(model: FlowModel, role: str, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled, penultimate hidden states) of one CLIP encoder."""
    encoder = model.encoders[role]
    out = encoder(_ids(model.tokenizers[role], text, CLIP_LENGTH).to(encoder.device), output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return pooled, out.hidden_states[-2]


def _t5(model: FlowModel, text: str, length: int) -> torch.Tensor | None:
    encoder = model.encoders.get("t5")
    if encoder is None:
        return None
    return encoder(_ids(model.tokenizers["t5"], text, length).to(encoder.device))[0]


def _sd3_text(model: FlowModel, text: str) -> dict[str, Any]:
    import torch

    l_pooled, l_hidden = _clip(model, "clip_l", text)
    g_pooled, g_hidden = _clip(model, "clip_g", text)
    width = int(model.transformer.config.joint_attention_dim)
    t5 = _t5(model, text, t5_length(model))
    if t5 is None:  # SD3 without T5: zeros in its place (diffusers' choice)
        t5 = torch.zeros(1, t5_length(model), width, dtype=l_hidden.dtype, device=l_hidden.device)
    clip = torch.cat([l_hidden, g_hidden], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    states = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
    return {"encoder_hidden_states": states.float(), "pooled_projections": torch.cat([l_pooled, g_pooled], -1).float()}


def _flux_text(model: FlowModel, text: str) -> dict[str, Any]:
    pooled, _ = _clip(model, "clip_l", text)
    t5 = _t5(model, text, t5_length(model))
    assert t5 is not None  # the loader refuses a Flux model without T5
    return {"encoder_hidden_states": t5.float(), "pooled_projections": pooled.float()}


def encode(
    model: FlowModel, prompt: str, negative: str, guidance: float, context: RunContext, true_cfg: float | None = None
) -> Conditioning:
    """``true_cfg`` > 1 (Flux): FluxPipeline's ``true_cfg_scale``, the negative prompt's pass (batched with the
    prompt's here) mixed in as CFG, on top of the distilled guidance."""
    import torch

    true_cfg = float(true_cfg or 1.0)
    prepare_text_encoders(model, context)
    with torch.inference_mode():
        if model.family.arch == "sd3":
            text = Conditioning(_sd3_text(model, prompt), _sd3_text(model, negative), guidance)
        else:
            uncond = _flux_text(model, negative) if true_cfg > 1 else None
            text = Conditioning(_flux_text(model, prompt), uncond, true_cfg)
    if low_memory(context):
        release_encoders(model)
    if model.family.arch == "sd3":
        return text
    if model.family.guidance_embeds:  # both passes of true CFG take the distilled guidance, as in diffusers
        for branch in (text.cond, text.uncond or {}):
            branch["guidance"] = torch.full((1,), guidance, dtype=torch.float32)
    if negative and text.uncond is None:
        context.logger.warning("Flux takes a negative prompt only with --true-cfg above 1; it is ignored")
    return text


def prepare_text_encoders(model: FlowModel, context: RunContext) -> None:
    import torch

    dtype = context.torch_dtype
    if dtype == torch.float16 and context.device == "cpu":
        dtype = torch.float32
    for role, encoder in model.encoders.items():
        # T5 overflows in fp16 (its feed-forward outputs exceed 65504): bf16 instead.
        run_dtype = torch.bfloat16 if role == "t5" and dtype == torch.float16 else dtype
        torch.nn.Module.to(encoder, device=context.torch_device, dtype=run_dtype).eval()


def low_memory(context: RunContext) -> bool:
    """Whether the run asked for the low-memory mode (the torch backend's ``offload=model``)."""
    return context.backend is not None and context.backend.options.get("offload") == "model"


def release_encoders(model: FlowModel) -> None:
    """Drop the text encoders (T5-XXL alone is 9.5 GB in fp16); the next run loads them again."""
    from difftool.core.cuda import runtime

    model.encoders.clear()
    gc.collect()
    runtime().empty_cache()


@contextmanager
def on_device(module: Any, context: RunContext) -> Iterator[Any]:
    """``module`` on the run's device for the block; in low-memory mode back on the CPU after it."""
    import torch

    torch.nn.Module.to(module, device=context.torch_device)
    try:
        yield module
    finally:
        if low_memory(context) and context.device != "cpu":
            from difftool.core.cuda import runtime

            torch.nn.Module.to(module, device="cpu")
            runtime().empty_cache()


def check_size(model: FlowModel, width: int, height: int) -> None:
    step = model.vae_scale * 2  # VAE downsampling x the transformer's 2 x 2 patches
    for name, value in (("width", width), ("height", height)):
        if value % step:
            raise ParameterError(
                f"{model.family.label} needs a {name} in multiples of {step}; got {value}",
                f"pass a {name} such as {max(step, value // step * step)}",
            )


def encode_image(model: FlowModel, rgb: Any, context: RunContext) -> torch.Tensor:
    """An H x W x 3 [0, 1] image -> the latents img2img starts from, sampled from the VAE's distribution with
    the run's generator (before the noise, as diffusers' Flux / SD3 img2img pipelines draw them)."""
    import torch

    vae = model.vae
    dtype = torch.float32 if context.torch_dtype == torch.float16 else context.torch_dtype
    torch.nn.Module.to(vae, dtype=dtype).eval()
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None] * 2 - 1
    with on_device(vae, context), torch.inference_mode():
        latents = vae.encode(pixels.to(context.torch_device, dtype)).latent_dist.sample(generator=context.generator)
    return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).float()


def sample_latents(
    model: FlowModel,
    text: Conditioning,
    context: RunContext,
    *,
    size: tuple[int, int],
    steps: int,
    scheduler: str,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    noise: torch.Tensor | None = None,
    step_hook_for: Callable[[Any], Any] | None = None,
    shift: float | None = None,
    controls: Any = None,
) -> torch.Tensor:
    """Latents (1, 16, h, w) for ``size`` through the core sampler; from ``init`` noised to ``strength``
    (img2img) when given. ``noise``: drawn already (inpainting draws it between two VAE samples);
    ``step_hook_for(scheduler)``: the core sampler's step hook, made with the run's scheduler (which
    inpainting's latent blending noises the known region with); ``shift`` in place of the model's
    (``--shift``); ``controls``: ControlNet units (:func:`.controlled.controls_for`)."""
    from difftool.core.sampler import sample
    from difftool.plugins.builtin.flow.exported import transformer_denoiser
    from difftool.plugins.builtin.flow.samplers import with_shift

    width, height = size
    h, w = height // model.vae_scale, width // model.vae_scale
    config = {**with_shift(model.scheduler_config, shift), "image_seq_len": (h // 2) * (w // 2)}
    config["flux_sigmas"] = model.family.arch == "flux"
    with on_device(model.transformer, context) as transformer:
        cfg = text.uncond is not None and text.guidance_scale != 1.0  # torch, or the export on onnx / tensorrt
        tokens = int(text.cond["encoder_hidden_states"].shape[1])
        denoiser = transformer_denoiser(model, transformer, context, (h, w), cfg=cfg, text=tokens)
        context.denoisers.append(denoiser)
        flow_scheduler = context.make_scheduler(scheduler, config)
        if controls:
            from difftool.plugins.builtin.flow.control_denoiser import ControlledFlowDenoiser

            denoiser = ControlledFlowDenoiser(denoiser, controls, flow_scheduler)
        return sample(
            denoiser,
            flow_scheduler,
            steps=steps,
            context=context,
            shape=(1, denoiser.sample_channels, h, w),
            init=init,
            strength=strength,
            cond=text.cond,
            uncond=text.uncond,
            guidance_scale=text.guidance_scale,
            noise=noise,
            step_hook=step_hook_for(flow_scheduler) if step_hook_for is not None else None,
            decode_preview=(lambda x0: _preview(model, x0, context)) if context.preview_every else None,
        )


def decode(model: FlowModel, latents: torch.Tensor, context: RunContext) -> torch.Tensor:
    """Latents -> a [-1, 1] float32 image batch on the CPU (scaled and shifted back as diffusers does)."""
    import torch

    vae = model.vae
    dtype = torch.float32 if context.torch_dtype == torch.float16 else context.torch_dtype
    torch.nn.Module.to(vae, dtype=dtype).eval()
    with on_device(vae, context), torch.inference_mode():
        z = latents.to(context.torch_device, dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z).sample.float().cpu()
    if not bool(torch.isfinite(image).all()):
        raise ModelError("the VAE produced NaN or Inf values; nothing was written", "run with --dtype fp32")
    return image


def _preview(model: FlowModel, x0: torch.Tensor, context: RunContext) -> Any:
    from difftool.core.images import to_pil
    from difftool.plugins.builtin.sd.pipeline import to_numpy

    return to_pil(to_numpy(decode(model, x0[:1], context)))
