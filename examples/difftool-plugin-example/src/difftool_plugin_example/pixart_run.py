"""PixArt-Sigma's ``generate``: diffusers' own parts (text encoding, transformer, VAE, image post-processing)
around difftool's core sampler, so ``--scheduler``, ``--seed``, progress, previews and cancellation work as
for every family, and a seed gives the image diffusers' ``PixArtSigmaPipeline`` gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difftool.core.denoiser import TorchDenoiser
from difftool.core.errors import ParameterError
from difftool.core.models import model_path
from difftool.core.runtime import current
from difftool.core.sampler import sample
from difftool.core.task import RunContext, TaskRequest, TaskResult

#: T5 tokens PixArt-Sigma reads (the pipeline's ``max_sequence_length``); the rest is dropped.
T5_TOKENS = 300
#: Options of ``generate`` this family does not take (refused when set).
NOT_TAKEN = ("lora", "embedding", "refiner", "control", "reference", "hires", "vae")


class CoreCall(torch.nn.Module):
    """PixArt's transformer in the call convention core's TorchDenoiser uses, ``module(sample, t, **cond)``:
    the timestep as one value per batch item, and the learned-variance half of the output dropped (the
    pipeline does the same after guidance; guidance is linear, so the order does not matter)."""

    def __init__(self, transformer: Any) -> None:
        super().__init__()
        self.transformer = transformer
        self.config = transformer.config
        self.learned_sigma = transformer.config.out_channels == 2 * transformer.config.in_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        none = {"resolution": None, "aspect_ratio": None}  # Sigma takes no size conditioning
        timestep = t.reshape(-1).expand(x.shape[0])
        out = self.transformer(x, timestep=timestep, added_cond_kwargs=none, return_dict=False, **cond)[0]
        return out.chunk(2, dim=1)[0] if self.learned_sigma else out


def load(context: RunContext) -> Any:
    """The model's diffusers pipeline (its parts), loaded once per model, dtype and device."""
    from diffusers import PixArtSigmaPipeline

    path = model_path(context.model or "", context.registry)
    key = (str(Path(path).resolve()), context.torch_dtype, str(context.torch_device))
    cache = current().cache("example-pixart", dict)
    if key not in cache:
        cache.clear()  # one model at a time
        pipe = PixArtSigmaPipeline.from_pretrained(path, torch_dtype=context.torch_dtype, local_files_only=True)
        cache[key] = pipe.to(context.torch_device)
    return cache[key]


def generate(request: TaskRequest, context: RunContext) -> TaskResult:
    params = request.params
    for name in NOT_TAKEN:
        if params[name]:
            raise ParameterError(f"--{name} is not supported for PixArt-Sigma models", f"drop --{name}")
    if params["clip_skip"] != 1:
        raise ParameterError("--clip-skip is not supported for PixArt-Sigma models (T5)", "drop --clip-skip")
    pipe = load(context)
    native = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    width, height = params["width"] or native, params["height"] or native
    step = pipe.vae_scale_factor * pipe.transformer.config.patch_size
    if width % step or height % step:
        raise ParameterError(f"PixArt-Sigma needs sizes in multiples of {step}; got {width}x{height}",
                             f"pass --width and --height in multiples of {step}")  # fmt: skip
    guidance = float(params["guidance_scale"])
    guided = guidance > 1.0  # the pipeline's rule: no unconditional batch at 1 or below
    with torch.inference_mode():
        embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(
            params["prompt"] or "", guided, negative_prompt=params["negative_prompt"] or "",
            device=context.torch_device, clean_caption=False, max_sequence_length=T5_TOKENS,
        )  # fmt: skip
    cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
    uncond = {"encoder_hidden_states": neg_embeds, "encoder_attention_mask": neg_mask} if guided else None
    scheduler = context.make_scheduler(params["scheduler"], dict(pipe.scheduler.config))
    denoiser = TorchDenoiser(CoreCall(pipe.transformer), prediction_type=scheduler.prediction_type,
                             sample_channels=pipe.transformer.config.in_channels, device=context.device,
                             dtype=context.torch_dtype)  # fmt: skip
    context.denoisers.append(denoiser)
    latents = sample(
        denoiser, scheduler, steps=int(params["steps"]), context=context, guidance_scale=guidance, cond=cond,
        uncond=uncond, shape=(1, denoiser.sample_channels, height // pipe.vae_scale_factor,
                              width // pipe.vae_scale_factor),
    )  # fmt: skip
    with torch.inference_mode():
        vae = pipe.vae
        image = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    pil = pipe.image_processor.postprocess(image.float().cpu(), output_type="pil")[0]
    record = {"task": "generate", "family": "pixart-sigma", "size": f"{width}x{height}",
              "scheduler": params["scheduler"]}  # fmt: skip
    return TaskResult([pil], record)
