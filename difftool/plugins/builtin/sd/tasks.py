"""The ``generate`` (text-to-image) and ``style`` (img2img style transfer) tasks on Stable Diffusion.

Both need ``--model``: a checkpoint or diffusers folder the user owns (nothing is downloaded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

from difftool.core.errors import ParameterError
from difftool.core.images import LoadedImage, to_pil
from difftool.core.params import Params
from difftool.core.scheduler import steps_for_strength
from difftool.core.task import ExportShapes, Param, Port, RunContext, Task, TaskRequest, TaskResult
from difftool.plugins.builtin.sd import control, embeddings, hires, ip_adapter, pipeline, refiner
from difftool.plugins.builtin.sd.control import CONTROL_PARAM
from difftool.plugins.builtin.sd.families import BASE_FAMILIES
from difftool.plugins.builtin.sd.family_params import FLOW_PARAMS, refuse_flow_params
from difftool.plugins.builtin.sd.models import LOAD_PARAMS, delegated_family, native_size_of, sd_model_for, split_loras
from difftool.plugins.builtin.sd.prompt_chunks import check_prompt_length, prompt_param, prompt_tokens
from difftool.plugins.builtin.sd.styles import STYLE_PRESETS, style_prompt
from difftool.plugins.hookspecs import hookimpl

if TYPE_CHECKING:  # controlled imports torch: listing tasks must not
    from difftool.core.backend import ResolvedBackend
    from difftool.plugins.builtin.sd.controlled import PreparedControl

DEFAULT_SCHEDULER, DEFAULT_STEPS = "dpmpp-2m-karras", 25

#: Read by :func:`encode_text`, so every task that runs a Stable Diffusion model declares it.
EMBEDDING_PARAM = Param(
    "embedding",
    "string",
    default=None,
    help="textual-inversion embedding file(s), comma-separated, used where their name is in a prompt "
    "(files in embeddings/ under the model roots are found by name)",
    parse=embeddings.parse_embedding_files,
)

#: Prompt parameters shared by every Stable Diffusion task.
PROMPT_PARAMS = (
    prompt_param("negative_prompt", default="", help="what the image should not show"),
    Param("steps", "int", default=DEFAULT_STEPS, min=1, max=500, help="denoising steps"),
    Param("guidance_scale", "float", default=7.0, min=0.0, max=50.0, help="classifier-free guidance (CFG) scale"),
    Param("scheduler", "choice", default=DEFAULT_SCHEDULER, choices_from="schedulers", help="sampler"),
    Param("clip_skip", "int", default=1, min=1, max=12, help="text encoder layer from the end (A1111: 1 = last)"),
    EMBEDDING_PARAM,
)

def latent_shapes(
    size: tuple[int, int], guidance_scale: float, exact: bool = True, tokens: tuple[int, int, int] = (77, 77, 77)
) -> ExportShapes:
    """What sampling ``size`` (pixels) asks of the U-Net: latents of side / 8, doubled for CFG.

    ``exact``: one size for the whole job (generate's --width/--height), so optimise for it. Otherwise
    the size comes from each input image and varies across a folder: declare a range that does not
    move with the image (up to 1024 px: one engine serves the whole folder instead of one per size).
    """
    side, short = max(1, max(size) // 8), max(1, min(size) // 8)
    cfg = 2 if guidance_scale != 1.0 else 1
    if exact:  # the short side bounds the profile from below: 1024 x 32 px is 128 x 4 latents
        return ExportShapes(batch=(1, cfg, cfg), size=(min(8, short), side, max(side, 128)), tokens=tokens)
    high = max(128, -(-side // 32) * 32)
    # From the smallest sample the U-Net takes (its multiple), whatever this image's short side.
    return ExportShapes(batch=(1, cfg, cfg), size=(1, 64, high), tokens=tokens)


def sample_maybe_refined(
    model: Any, refine: refiner.Refiner | None, context: RunContext, params: Params, **run: Any
) -> Any:
    """:func:`run_sd` with ``model``, or (with ``refine``) the base to the switch and the refiner after
    it (:func:`refiner.sample_refined`, which takes ``strength_flag`` too); latents either way."""
    if refine is None:
        run.pop("strength_flag", None)
        return run_sd(model, context, params, **run)
    return refiner.sample_refined(run_sd, model, refine, context, params, **run)


def sd_export_target(model: str | None) -> Any:
    """A Stable Diffusion checkpoint's U-Net in fp32, for ``difftool export FORMAT generate|style``."""
    from difftool.core.exporter import ExportTarget
    from difftool.plugins.builtin.sd.loader import load_sd_model

    if not model:
        raise ParameterError("exporting a Stable Diffusion task needs its model", "pass --model PATH")
    sd = load_sd_model(model)
    return ExportTarget(sd.unet, sd.unet_id, sd.prediction_type)


def encode_text(
    model: Any, context: RunContext, params: Params, prompt: str, negative: str, size: tuple[int, int]
) -> pipeline.TextConditioning:
    """The prompts as the U-Net's conditioning: LoRA tags dropped (applied by :func:`sd_model_for`),
    embeddings the texts name placed, A1111's chunking; SDXL's size conditioning for ``size``."""
    pipeline.prepare_text_encoders(model, context)
    prompt, _ = split_loras(prompt)
    widths = [int(encoder.config.hidden_size) for encoder in model.text_encoders]
    found = embeddings.named_in([prompt, negative], params.embedding, widths, params.allow_pickle)
    context.notes.update(embeddings.record(found))
    return pipeline.encode_prompt(
        model, prompt, negative, clip_skip=params.clip_skip, size=size, context=context, embeddings=found
    )


def run_sd(
    model: Any,
    context: RunContext,
    params: Params,
    *,
    prompt: str,
    negative: str,
    size: tuple[int, int],
    init: Any = None,
    strength: float = 1.0,
    init_noised: bool = False,
    extra: dict[str, Any] | None = None,
    noise: Any = None,
    step_hook: Any = None,
    scheduler: Any = None,
    shapes: ExportShapes | None = None,
    text: pipeline.TextConditioning | None = None,
    controls: Sequence[PreparedControl] = (),
) -> Any:
    """Sample latents for ``size`` (width, height) through the core sampler; returns latents.

    ``shapes``: what the denoiser is built for (default: the task's declared export shapes). ``text``:
    the prompts already encoded (:func:`encode_text`; a tiled task encodes once for all its tiles).
    ``controls``: ControlNet units prepared for ``size`` (:func:`sd.controlled.controls_for`).
    """
    from difftool.core.sampler import sample

    pipeline.check_exported_size(model, size, context)
    if text is None:
        text = encode_text(model, context, params, prompt, negative, size)
    if shapes is None and context.export_shapes is None:
        shapes = latent_shapes(size, params.guidance_scale, exact=False, tokens=prompt_tokens(prompt, negative))
    denoiser = pipeline.make_denoiser(model, context, shapes, residuals=bool(controls))
    runners: list[Any] = []
    if controls:  # exported (and built) before sampling, like the U-Net
        from difftool.plugins.builtin.sd.controlled import runners_for

        runners = runners_for(controls, context, shapes)
    if scheduler is None:
        scheduler = context.make_scheduler(params.scheduler, model.scheduler_config)
    width, height = size
    channels = model.unet.config.out_channels
    shape = (1, channels, height // model.vae_scale, width // model.vae_scale)

    guidance = params.guidance_scale
    denoiser = ip_adapter.wrapped(model, denoiser, guidance != 1.0)  # a --reference's image tokens

    def run() -> Any:
        from difftool.plugins.builtin.sd.controlled import ControlledDenoiser

        guided = guidance != 1.0
        active = ControlledDenoiser(denoiser, controls, runners, scheduler, guided) if controls else denoiser
        return sample(
            active,
            scheduler,
            steps=params.steps,
            context=context,
            shape=shape,
            init=init,
            strength=strength,
            init_noised=init_noised,
            cond={**text.cond, **(extra or {})},
            uncond=text.uncond,
            guidance_scale=guidance,
            noise=noise,
            step_hook=step_hook,
            decode_preview=pipeline.preview_decoder(model, context) if context.preview_every else None,
        )

    return with_attention_slicing_on_oom(run, model, context)


def with_attention_slicing_on_oom(run: Callable[[], Any], model: Any, context: RunContext) -> Any:
    """Run the sampler; out of memory once, retry it with sliced attention from the same random state."""
    from difftool.core.devices import is_out_of_memory, release_memory
    from difftool.core.errors import ModelError

    state = context.generator.get_state()
    try:
        return run()
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error) or not hasattr(model.unet, "set_attention_slice"):
            raise
    release_memory()
    context.logger.warning("out of memory in the U-Net; retrying with sliced attention")
    context.generator.set_state(state)
    processors = dict(model.unet.attn_processors)
    model.unet.set_attention_slice("max")
    try:
        return run()
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        release_memory()
        raise ModelError(
            "out of memory in the U-Net even with sliced attention", "use a smaller --width/--height or --dtype bf16"
        ) from None
    finally:
        model.unet.set_attn_processor(processors)  # back to the fast (SDPA) processors for the next run


class Generate(Task):
    name = "generate"
    summary = "Make an image from a text prompt with a Stable Diffusion model"
    uses_model = True
    exports = True
    model_families = BASE_FAMILIES
    inputs = ()
    params = (
        prompt_param("prompt", required=True, help="what to draw"),
        *PROMPT_PARAMS,
        Param("width", "int", default=None, min=8, max=4096, help="multiple of 8 (default: the model's native size)"),
        Param("height", "int", default=None, min=8, max=4096, help="multiple of 8 (default: the model's native size)"),
        *hires.HIRES_PARAMS,
        *refiner.REFINER_PARAMS,
        *FLOW_PARAMS,
        CONTROL_PARAM,
        *ip_adapter.REFERENCE_PARAMS,
        *LOAD_PARAMS,
    )

    def availability(self, model: str | None) -> str | None:
        return None if model else "it needs a Stable Diffusion model; pass --model PATH"

    def check(self, params: Params) -> None:
        check_prompt_length(params)
        ip_adapter.check(params)

    def output_size(self, params: Params, inputs: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
        """The requested size (a side left to the model: 1024, the largest native size), after hires."""
        size = (params.width or 1024, params.height or 1024)  # None: the model's native size, at most 1024
        return hires.target_size(size, params.hires) if hires.wanted(params) else size

    def check_backend(self, params: Mapping[str, Any], backend: ResolvedBackend) -> None:
        control.check_backend(params, backend)
        ip_adapter.check_backend(params, backend)

    def export_target(self, model: str | None) -> Any:
        return sd_export_target(model)

    def export_shapes(self, request: TaskRequest) -> ExportShapes:
        """One latent of the requested size (pixels / 8; a side left out: the model's native size, as the run
        does), doubled for classifier-free guidance."""
        params, native = request.params, native_size_of(request.model)
        size = (params.width or native, params.height or native)
        tokens = prompt_tokens(params.prompt, params.negative_prompt)
        shapes = latent_shapes(size, params.guidance_scale, tokens=tokens)
        if hires.wanted(params):  # one engine for both passes: up to the second pass's size
            side = max(hires.target_size(size, params.hires)) // 8
            shapes = dataclasses.replace(shapes, size=(shapes.size[0], shapes.size[1], max(shapes.size[2], side)))
        return shapes

    @ip_adapter.with_reference
    def run(self, request: TaskRequest, context: RunContext) -> TaskResult:
        family = delegated_family(context, self.name)
        if family is not None:  # another architecture's plugin (SD3, Flux) runs this model
            return family.run(self.name, request, context)
        refuse_flow_params(request.params)
        params = request.params
        model = sd_model_for(context, params)
        if model.family.inpainting:
            raise ParameterError(
                f"{model.name} is an inpainting model", "use it with `difftool run inpaint`, or pass a base model"
            )
        width = params.width or model.native_size  # None: the model's native size
        height = params.height or model.native_size
        pipeline.check_size(width, height, "the output")
        from difftool.plugins.builtin.sd import controlled

        texts = {"prompt": params.prompt, "negative": params.negative_prompt}
        record = {"task": self.name, "size": f"{width}x{height}", **model.record()}
        refine = refiner.refiner_for(params, model, context)
        controls = controlled.controls_for(params, model, context, (width, height))
        upscale = hires.wanted(params)
        # The refiner finishes the last pass (A1111's default "Hires refiner: second pass"); its VAE decodes.
        decoder = refine.model if refine is not None else model
        if upscale:  # the second pass's settings, checked (with the refiner's switch) before the first pass
            target = hires.target_size((width, height), params.hires)
            pipeline.check_size(*target, "the hires output")
            pipeline.check_exported_size(model, target, context)
            second = params.replace(steps=params.hires_steps or params.steps)  # None: --steps
            strength = hires.strength(params)
            steps_for_strength(second.steps, strength, "--hires-strength", "--hires-steps")  # no step: say so now
            if refine is not None:
                refiner.plan_shares(model, refine, context, second, strength, "--hires-strength")
        first = refine if not upscale else None
        latents = sample_maybe_refined(model, first, context, params, size=(width, height), controls=controls, **texts)
        if upscale:
            init = hires.upscale_latents(model, latents, target, params, context)
            again = {"init": init, "strength": strength, "strength_flag": "--hires-strength", "size": target}
            again["controls"] = controlled.controls_for(params, model, context, target)
            latents = sample_maybe_refined(model, refine, context, second, **again, **texts)
            record |= hires.record(params, target)
        if refine is not None:
            record |= refine.record()
        image = pipeline.decode_latents(decoder, latents, context)
        return TaskResult([to_pil(pipeline.to_numpy(image))], record)


class Style(Task):
    name = "style"
    summary = "Restyle an image (oil painting, watercolor, ...) with a Stable Diffusion model"
    uses_model = True
    exports = True
    model_families = BASE_FAMILIES
    inputs = (Port("image", "image", "the image to restyle"),)
    params = (
        Param("style", "choice", default=None, choices=tuple(STYLE_PRESETS), help="a preset style prompt"),
        prompt_param("prompt", default="", help="what the image shows, or a full style prompt"),
        Param("strength", "float", default=0.6, min=0.01, max=1.0, help="how far from the input (1: ignore it)"),
        *PROMPT_PARAMS,
        *refiner.REFINER_PARAMS,
        *FLOW_PARAMS,
        CONTROL_PARAM,
        *ip_adapter.REFERENCE_PARAMS,
        *LOAD_PARAMS,
    )

    def availability(self, model: str | None) -> str | None:
        return None if model else "it needs a Stable Diffusion model; pass --model PATH"

    def check(self, params: Params) -> None:
        check_prompt_length(params)
        ip_adapter.check(params)

    def check_backend(self, params: Mapping[str, Any], backend: ResolvedBackend) -> None:
        control.check_backend(params, backend)
        ip_adapter.check_backend(params, backend)

    def export_target(self, model: str | None) -> Any:
        return sd_export_target(model)

    def export_shapes(self, request: TaskRequest) -> ExportShapes:
        """The input's size varies across a folder: a range that holds it (one engine up to 1024 px)."""
        size = request.inputs["image"].size
        params = request.params
        prompt, negative = style_prompt(params.style, params.prompt, params.reference)  # what run() encodes
        tokens = prompt_tokens(prompt, negative, params.negative_prompt)
        return latent_shapes(size, params.guidance_scale, exact=False, tokens=tokens)

    @ip_adapter.with_reference
    def run(self, request: TaskRequest, context: RunContext) -> TaskResult:
        from difftool.plugins.builtin.sd import controlled

        family = delegated_family(context, self.name)
        if family is not None:  # another architecture's plugin (SD3, Flux) runs this model
            return family.run(self.name, request, context)
        refuse_flow_params(request.params)
        params = request.params
        image: LoadedImage = request.inputs["image"]
        prompt, negative = style_prompt(params.style, params.prompt, params.reference)
        negative = ", ".join(p for p in (params.negative_prompt, negative) if p)
        model = sd_model_for(context, params)
        if model.family.inpainting:
            raise ParameterError(f"{model.name} is an inpainting model", "pass a base (txt2img) model to style")
        # The VAE needs sizes in multiples of 8: work at the nearest such size, restore the input's after.
        width, height = (max(8, round(v / 8) * 8) for v in image.size)
        rgb = image.rgb
        if (width, height) != image.size:
            rgb = _resize(rgb, (width, height))
        refine = refiner.refiner_for(params, model, context)
        init = pipeline.encode_image(model, pipeline.to_tensor(rgb), context)
        source = controlled.ControlSource(rgb)
        run = {"prompt": prompt, "negative": negative, "size": (width, height), "init": init}
        run |= {"strength": params.strength}
        run |= {"controls": controlled.controls_for(params, model, context, (width, height), source)}
        latents = sample_maybe_refined(model, refine, context, params, **run)  # refined: base to the switch
        decoder = refine.model if refine is not None else model
        out = pipeline.to_numpy(pipeline.decode_latents(decoder, latents, context))
        if (width, height) != image.size:
            out = _resize(out, image.size)
        record = {"task": self.name, "prompt": prompt, "size": f"{image.width}x{image.height}", **model.record()}
        if refine is not None:
            record |= refine.record()
        if negative:
            record["negative_prompt"] = negative
        return TaskResult([to_pil(out, image.alpha)], record)


def _resize(rgb: Any, size: tuple[int, int]) -> Any:
    import numpy as np

    channels = [np.asarray(Image.fromarray(rgb[..., c], "F").resize(size, Image.Resampling.LANCZOS)) for c in range(3)]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32)


@hookimpl
def register_tasks(register: Callable[[type[Task]], None]) -> None:
    register(Generate)
    register(Style)
