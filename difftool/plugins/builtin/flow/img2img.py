"""``style`` (img2img) for SD3 and Flux, step for step as diffusers' StableDiffusion3Img2ImgPipeline and
FluxImg2ImgPipeline: the input encoded by the VAE (a sample of its distribution, drawn before the noise),
noised to the flow schedule's sigma at ``--strength`` and denoised from there.

Sizes: the transformer needs multiples of 16 pixels (8 for the VAE x 2 x 2 patches); the input is resized
down to the nearest such size, as diffusers does, and the output back to the input's size (as SD's style).
"""

from __future__ import annotations

from typing import Any

from difftool.core.errors import ParameterError
from difftool.core.images import LoadedImage
from difftool.core.task import RunContext, TaskRequest, TaskResult


def _resize(rgb: Any, size: tuple[int, int]) -> Any:
    import numpy as np
    from PIL import Image

    pixels = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    return np.asarray(pixels, dtype=np.float32) / 255  # diffusers' image processor: 8-bit, Lanczos


def style(request: TaskRequest, context: RunContext, model: Any) -> TaskResult:
    from difftool.core.images import to_pil
    from difftool.plugins.builtin.flow import pipeline, redux
    from difftool.plugins.builtin.flow.samplers import shift_record
    from difftool.plugins.builtin.flow.scheduler import run_scheduler
    from difftool.plugins.builtin.sd.models import split_loras
    from difftool.plugins.builtin.sd.pipeline import to_numpy
    from difftool.plugins.builtin.sd.styles import style_prompt

    params = request.params
    image: LoadedImage = request.inputs["image"]
    if model.family.inpainting:
        raise ParameterError(f"{model.name} is a {model.family.label} model", "pass a Flux.1 dev or schnell model")
    prompt = split_loras(str(params["prompt"] or ""))[0]
    prompt, preset_negative = style_prompt(params["style"], prompt, params["reference"])  # Redux: no prompt needed
    # Flux takes no negative prompt: a preset's is SD3's alone (the user's still draws Flux's warning).
    negative = [params["negative_prompt"] or "", preset_negative if model.family.arch == "sd3" else ""]
    negative_prompt = ", ".join(p for p in negative if p)
    step = model.vae_scale * 2
    width, height = (max(step, v // step * step) for v in image.size)
    rgb = image.rgb if (width, height) == image.size else _resize(image.rgb, (width, height))
    guidance = float(params["guidance_scale"])
    text = pipeline.encode(model, prompt, negative_prompt, guidance, context, params["true_cfg"])
    text = redux.attach(model, text, params, context)  # a --reference's Redux tokens
    init = pipeline.encode_image(model, rgb, context)
    scheduler = run_scheduler(params["scheduler"], model.family.label)
    strength = float(params["strength"])
    latents = pipeline.sample_latents(model, text, context, size=(width, height), steps=int(params["steps"]),
                                      scheduler=scheduler, init=init, strength=strength,
                                      shift=params["shift"])  # fmt: skip
    out = to_numpy(pipeline.decode(model, latents, context))
    if (width, height) != image.size:
        out = _resize(out, image.size)
    record = {"task": "style", "prompt": prompt, "size": f"{image.width}x{image.height}", "strength": strength}
    record |= {"scheduler": scheduler, **model.record(), **shift_record(model, params["shift"], (width, height))}
    if model.family.guidance_embeds:
        record["distilled_guidance"] = guidance
    if negative_prompt and model.family.arch == "sd3":
        record["negative_prompt"] = negative_prompt
    return TaskResult([to_pil(out, image.alpha)], record)
