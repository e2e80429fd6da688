"""The Stable Diffusion pieces around the core sampler: text conditioning, VAE encode/decode, latents.

Each step follows diffusers' reference pipelines (StableDiffusion, Img2Img, Inpaint and their SDXL
versions) closely enough that the same weights, seed and scheduler give the same image: random
numbers are drawn from the run's generator in the same order (VAE posterior samples, then noise).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from difftool.core.errors import ModelError, ParameterError
from difftool.core.task import RunContext
from difftool.plugins.builtin.sd.loader import SDModel

if TYPE_CHECKING:
    import torch

log = logging.getLogger("difftool")
#: Decode in tiles above this many output pixels, so a large image's VAE decode fits memory.
TILED_DECODE_PIXELS = 1536 * 1536
#: The aesthetic scores an SDXL refiner is conditioned on (diffusers' and A1111's defaults).
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


@dataclass
class TextConditioning:
    cond: dict[str, Any]
    uncond: dict[str, Any]


def encode_prompt(
    model: SDModel,
    prompt: str,
    negative: str,
    *,
    clip_skip: int = 1,
    size: tuple[int, int] | None = None,
    context: RunContext | None = None,
    embeddings: Sequence[Any] = (),
) -> TextConditioning:
    """Prompt and negative prompt -> the U-Net's cross-attention inputs (and SDXL's added conditions).

    ``clip_skip`` follows A1111: 1 uses the last layer, 2 the one before it. Prompts of any length are
    read in 75-token chunks (:mod:`prompt_chunks`), ``embeddings`` are placed where their names appear,
    and the shorter of prompt and negative is padded with the empty prompt's chunks (A1111's "Pad
    prompt/negative prompt" option, recorded as ``Pad conds``: both go through the U-Net in one batch).
    """
    import torch

    if clip_skip < 1:
        raise ParameterError(f"clip skip {clip_skip} is below 1", "pass --clip-skip 1 (last layer) or 2")
    runners = _encoder_runners(model, context)
    with torch.inference_mode():
        pos, pos_pooled = _encode(model, runners, prompt, clip_skip, embeddings)
        neg, neg_pooled = _encode(model, runners, negative, clip_skip, embeddings)
        if pos.shape[1] != neg.shape[1]:
            empty, _ = _encode(model, runners, "", clip_skip, ())
            pos, neg = (_pad_with(t, empty, max(pos.shape[1], neg.shape[1])) for t in (pos, neg))
            if context is not None:
                context.notes["pad_conds"] = True
    cond: dict[str, Any] = {"encoder_hidden_states": pos}
    uncond: dict[str, Any] = {"encoder_hidden_states": neg}
    if model.family.xl:
        if size is None:
            raise ValueError("SDXL conditioning needs the image size")
        width, height = size
        # original size, crop top-left, target size (diffusers' defaults: no crop, original = target);
        # a refiner takes an aesthetic score instead of the target size (diffusers' defaults 6 and 2.5).
        if model.family.refiner:
            pos_ids = [height, width, 0, 0, AESTHETIC_SCORE]
            neg_ids = [height, width, 0, 0, NEGATIVE_AESTHETIC_SCORE]
        else:
            pos_ids = neg_ids = [height, width, 0, 0, height, width]
        cond["added_cond_kwargs"] = {"text_embeds": pos_pooled, "time_ids": torch.tensor([pos_ids], dtype=pos.dtype)}
        uncond["added_cond_kwargs"] = {"text_embeds": neg_pooled, "time_ids": torch.tensor([neg_ids], dtype=pos.dtype)}
    return TextConditioning(cond, uncond)


def _pad_with(states: Any, empty: Any, length: int) -> Any:
    import torch

    repeats = (length - states.shape[1]) // empty.shape[1]
    return torch.cat([states, *[empty] * repeats], dim=1) if repeats else states


def _encoder_runners(model: SDModel, context: RunContext | None) -> list[Any]:
    """Per text encoder: (ids, chunks) -> (first output, hidden states by layer, layer -> normalised states).

    PyTorch modules, or their ONNX exports when the run asks for the whole pipeline in ONNX Runtime.
    """
    from difftool.plugins.builtin.sd import embeddings, onnx_parts

    if onnx_parts.whole_pipeline(context):
        assert context is not None
        runners = []
        for index in range(len(model.text_encoders)):
            module = onnx_parts.text_encoder(model, index, context.device)

            def run(ids: Any, chunks: Any, module: Any = module) -> tuple[Any, Any, Any]:
                if any(chunk.embeddings for chunk in chunks):
                    raise ParameterError(
                        "textual-inversion embeddings need the PyTorch text encoders",
                        "drop --backend-opt export=all (the U-Net still runs in ONNX Runtime)",
                    )
                first, hidden, normed = module(ids)
                return first, hidden, lambda layer: normed[layer]

            runners.append(run)
        return runners

    def torch_runner(encoder: Any) -> Any:
        def run(ids: Any, chunks: Any) -> tuple[Any, Any, Any]:
            with embeddings.injected(encoder, chunks):
                out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
            return out[0], out.hidden_states, lambda layer: _final_norm(encoder)(out.hidden_states[layer])

        return run

    return [torch_runner(encoder) for encoder in model.text_encoders]


def _encode(model: SDModel, runners: list[Any], text: str, clip_skip: int, found: Sequence[Any]) -> tuple[Any, Any]:
    """One text through every encoder, chunk by chunk: (1, 77 x chunks, widths summed), and SDXL's pooled
    output of the first chunk (A1111's choice)."""
    import torch

    from difftool.plugins.builtin.sd.embeddings import EmbeddingFinder
    from difftool.plugins.builtin.sd.prompt_chunks import chunk_prompt, no_embeddings

    hidden, pooled = [], None
    for tokenizer, run in zip(model.tokenizers, runners, strict=True):
        finder = EmbeddingFinder(tokenizer, found) if found else no_embeddings
        chunks = chunk_prompt(tokenizer, text, finder)
        first, layers, normed = run(torch.tensor([c.ids for c in chunks]), chunks)
        if model.family.xl:
            # SDXL: penultimate layer (+ clip skip), no final norm; pooled output of the last encoder.
            states = layers[-(clip_skip + 1)]
            if first.ndim == 2:
                pooled = first[:1]
        elif clip_skip == 1:
            states = first
        else:
            states = normed(-clip_skip)
        rows = []
        for row, chunk in enumerate(chunks):
            part = states[row : row + 1]
            if any(w != 1.0 for w in chunk.weights):
                # A1111: scale each token's features by its weight, then restore the chunk's mean.
                mean = part.float().mean()
                part = part * torch.tensor(chunk.weights, dtype=part.dtype, device=part.device)[None, :, None]
                part = part * (mean / part.float().mean()).to(part.dtype)
            rows.append(part)
        hidden.append(torch.cat(rows, dim=1))
    return torch.cat(hidden, dim=-1).float(), None if pooled is None else pooled.float()


def _final_norm(encoder: Any) -> Any:
    text_model = getattr(encoder, "text_model", encoder)
    return text_model.final_layer_norm


def check_size(width: int, height: int, what: str = "the image") -> None:
    for name, value in (("width", width), ("height", height)):
        if value % 8:
            raise ParameterError(
                f"{what}'s {name} {value} is not a multiple of 8", f"pass a {name} such as {max(8, value // 8 * 8)}"
            )


def check_exported_size(model: SDModel, size: tuple[int, int], context: RunContext) -> None:
    """On an exported U-Net (any backend but torch), latent sides must be multiples of its downsampling
    (SD 1.x: 8 cells, 64 px): refused here, before any engine is built for them."""
    if context.backend_name == "torch":
        return
    from difftool.exporters.onnx import UNetSignature

    step = UNetSignature.of(model.unet).multiple * model.vae_scale
    for name, value in zip(("width", "height"), size, strict=True):
        if value % step:
            raise ParameterError(
                f"--backend {context.backend_name} runs this model at sizes in multiples of {step} px; "
                f"the {name} is {value}",
                f"pass a {name} such as {max(step, value // step * step)}, or use --backend torch",
            )


def vae_dtype(model: SDModel, dtype: torch.dtype) -> torch.dtype:
    """fp16 VAEs overflow to NaN (SD's VAE notoriously); run them in fp32 unless the run is bf16."""
    import torch

    return torch.float32 if dtype == torch.float16 else dtype


def encode_image(model: SDModel, image: torch.Tensor, context: RunContext) -> torch.Tensor:
    """A [-1, 1] image batch -> scaled latents, sampled from the VAE posterior with the run's generator."""
    import torch

    from difftool.plugins.builtin.sd import onnx_parts

    vae = _vae_on(model, context)
    with torch.inference_mode():
        if onnx_parts.whole_pipeline(context):
            mean, std = onnx_parts.vae_encoder(model, context.device)(image.float())
        else:
            dist = vae.encode(image.to(context.torch_device, next(vae.parameters()).dtype)).latent_dist
            mean, std = dist.mean, dist.std
        noise = torch.randn(mean.shape, generator=context.generator, dtype=torch.float32)
        latents = mean.float() + std.float() * noise.to(mean.device)
    return latents * vae.config.scaling_factor


def decode_latents(model: SDModel, latents: torch.Tensor, context: RunContext) -> torch.Tensor:
    """Latents -> a [-1, 1] float32 image batch on the CPU. NaN or Inf in the result is an error."""
    import torch

    from difftool.core.devices import is_out_of_memory, release_memory
    from difftool.plugins.builtin.sd import onnx_parts

    vae = _vae_on(model, context)
    pixels = latents.shape[-1] * latents.shape[-2] * model.vae_scale**2
    tiled = pixels > TILED_DECODE_PIXELS
    if not tiled and onnx_parts.whole_pipeline(context):
        decoder = onnx_parts.vae_decoder(model, context.device)
        image = decoder(latents.float() / vae.config.scaling_factor)[0].float().cpu()
        return _checked(image)
    while True:
        vae.enable_tiling() if tiled else vae.disable_tiling()
        try:
            with torch.inference_mode():
                z = latents.to(context.torch_device, next(vae.parameters()).dtype) / vae.config.scaling_factor
                image = vae.decode(z).sample.float().cpu()
            break
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            release_memory()
            if tiled:
                tile = getattr(vae, "tile_sample_min_size", "?")
                raise ModelError(
                    f"out of memory decoding {pixels} px even in {tile} px VAE tiles",
                    "close other programs, use a smaller --width/--height or --device cpu",
                ) from None
            context.logger.warning("out of memory in the VAE decode; retrying in tiles")
            tiled = True
    return _checked(image)


def _checked(image: torch.Tensor) -> torch.Tensor:
    import torch

    if not bool(torch.isfinite(image).all()):
        raise ModelError(
            "the VAE produced NaN or Inf values; nothing was written",
            "run with --dtype fp32, or pass a fixed VAE with --vae",
        )
    return image


def _vae_on(model: SDModel, context: RunContext) -> Any:
    import torch

    from difftool.plugins.builtin.sd import onnx_parts

    # An exported VAE decoder is made from these weights: keep them fp32, never rounded in place.
    dtype = torch.float32 if onnx_parts.whole_pipeline(context) else vae_dtype(model, context.torch_dtype)
    return torch.nn.Module.to(model.vae, device=context.torch_device, dtype=dtype).eval()


def prepare_text_encoders(model: SDModel, context: RunContext) -> None:
    import torch

    from difftool.plugins.builtin.sd import onnx_parts

    if onnx_parts.whole_pipeline(context):
        return  # they are exported from their fp32 weights and run in ONNX Runtime
    dtype = torch.float32 if context.torch_dtype == torch.float16 and context.device == "cpu" else context.torch_dtype
    for encoder in model.text_encoders:
        torch.nn.Module.to(encoder, device=context.torch_device, dtype=dtype).eval()


def make_denoiser(model: SDModel, context: RunContext, shapes: Any = None, residuals: bool = False) -> Any:
    """The U-Net on the run's backend; ``residuals``: the variant taking ControlNet residuals."""
    if residuals:
        from difftool.plugins.builtin.sd.control_backend import residual_denoiser

        return residual_denoiser(
            context, model.unet, prediction_type=model.prediction_type, model_id=model.unet_id, shapes=shapes
        )
    return context.make_denoiser(
        model.unet, prediction_type=model.prediction_type, model_id=model.unet_id, shapes=shapes
    )


def preview_decoder(model: SDModel, context: RunContext) -> Any:
    def decode(x0: torch.Tensor) -> Any:
        from difftool.core.images import to_pil

        image = decode_latents(model, x0[:1], context)
        return to_pil(to_numpy(image))

    return decode


def to_tensor(rgb: Any) -> torch.Tensor:
    """H x W x 3 float [0, 1] numpy -> 1 x 3 x H x W in [-1, 1]."""
    import torch

    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() * 2 - 1


def to_numpy(image: torch.Tensor) -> Any:
    """1 x 3 x H x W in [-1, 1] -> H x W x 3 float32 in [0, 1] (diffusers' postprocess)."""
    return (image[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
