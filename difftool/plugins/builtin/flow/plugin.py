"""The SD3 / Flux plugin: registered through the same hooks a third-party family would use.

``register_families``: ``generate``, ``style`` and ``inpaint`` run SD 3.5 and Flux.1 models (``--model`` a diffusers
folder, a ``.safetensors`` or a ``.gguf`` file). ``register_schedulers``: ``flow-euler``, which these
families use unless ``--scheduler`` names another flow scheduler (``flow-dpmpp-2m``, ``flow-unipc``,
``flow-euler-karras``, ``flow-euler-beta``: :mod:`.samplers`; ``euler``, ``dpmpp-2m`` and ``unipc`` mean
their flow variants, other SD samplers are refused).
``register_models``: ComfyUI's ``models/diffusion_models`` and ``models/unet``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from difftool.core import phases
from difftool.core.errors import ParameterError
from difftool.core.family import ModelFamily
from difftool.core.models import ModelEntry, ModelSource
from difftool.core.runtime import current
from difftool.core.task import RunContext, TaskRequest, TaskResult
from difftool.plugins.builtin.flow import redux
from difftool.plugins.builtin.flow.families import FAMILIES
from difftool.plugins.builtin.flow.samplers import FLOW_SAMPLERS, check_flow_params, shift_record
from difftool.plugins.builtin.flow.scheduler import NAME as SCHEDULER
from difftool.plugins.builtin.flow.scheduler import flow_euler, run_scheduler
from difftool.plugins.hookspecs import hookimpl

#: ComfyUI's folders for transformer-only files, under a model root.
DIFFUSION_FOLDERS = ("models/diffusion_models", "models/unet", "diffusion_models", "unet")
#: ``generate`` options these families do not take yet (refused when set).
NOT_YET = ("embedding", "refiner")


class FlowFamilies(ModelFamily):
    name = "flow"
    families = tuple(FAMILIES)
    tasks = ("generate", "style", "inpaint", "upscale-sd")
    #: ``--reference`` is read here (Flux Redux, :mod:`flow.redux`), not by SD's IP-Adapter.
    takes_reference = True

    def detect(self, path: Path) -> str | None:
        from difftool.plugins.builtin.flow.loader import is_flow_model

        family = is_flow_model(Path(path))
        return family.name if family else None

    def defaults(self, family: str, task: str) -> Mapping[str, Any]:
        own = FAMILIES.get(family)
        return {} if own is None else {"steps": own.steps, "guidance_scale": own.guidance_scale}

    def run(self, task: str, request: TaskRequest, context: RunContext) -> TaskResult:
        if task == "generate":
            return generate(request, context)
        from difftool.plugins.builtin.flow.controlled import check_task

        if task != "style" and _given(request, "reference"):  # Redux is wired into generate and style only
            raise ParameterError(f"--reference (Flux Redux) runs with generate and style, not {task} yet",
                                 "drop --reference")  # fmt: skip
        model = _checked_model(request, context)
        if task == "upscale-sd":  # the SD tiles, each repainted by this family's img2img
            from difftool.plugins.builtin.flow.upscale import upscale_sd

            return upscale_sd(request, context, model)
        check_task(task, request.params, model.family.label)  # --control: generate only
        if task == "inpaint":  # Flux Fill as FluxFillPipeline; SD3, Flux dev / schnell by latent blending
            from difftool.plugins.builtin.flow.inpaint import inpaint

            return inpaint(request, context, model)
        from difftool.plugins.builtin.flow.img2img import style

        return style(request, context, model)


def _check_options(params: Mapping[str, Any], label: str) -> None:
    for name in NOT_YET:
        if name in params and params[name] and params[name] != 1.0:  # unset: None, "", (), or hires 1
            flag = "--" + name.replace("_", "-")
            raise ParameterError(f"{flag} is not supported for {label} models yet", f"drop {flag}")
    if int(params["clip_skip"]) != 1:
        raise ParameterError(f"--clip-skip is not supported for {label} models", "drop --clip-skip")


def flow_model_for(context: RunContext, params: Mapping[str, Any]) -> Any:
    """Load (or reuse: one model at a time) the SD3 / Flux model the run names."""
    from difftool.plugins.builtin.flow import pipeline
    from difftool.plugins.builtin.flow.loader import load_flow_model
    from difftool.plugins.builtin.flow.lora import apply_lora
    from difftool.plugins.builtin.models import model_roots as roots
    from difftool.plugins.builtin.sd.models import lora_files, prompt_loras, resolve_path

    path = resolve_path(context.model, context)
    offload = pipeline.low_memory(context)
    # ``--lora PATH[:W]`` and the prompt's ``<lora:NAME:W>`` tags, as for Stable Diffusion
    loras = lora_files(params["lora"]) + prompt_loras(str(params["prompt"] or ""), context)
    key = (str(path.resolve()), path.stat().st_mtime_ns, str(params["vae"]), context.dtype, context.device, offload,
           tuple((str(p), w, p.stat().st_mtime_ns) for p, w in loras))  # fmt: skip
    cache = current().cache("flow-models", dict)
    if key not in cache or not cache[key].encoders:  # low-memory mode freed the last run's text encoders
        cache.clear()
        phases.announce(f"loading model {path.name}")
        model = load_flow_model(path, dtype=context.torch_dtype, vae=params["vae"], roots=tuple(roots()))
        for lora, weight in loras:
            apply_lora(model, lora, weight)
        if context.device != "cpu" and not offload:  # offload: on the GPU only while sampling
            import torch

            torch.nn.Module.to(model.transformer, device=context.torch_device)
        cache[key] = model
    context.cancel.raise_if_cancelled()
    return cache[key]


def _checked_model(request: TaskRequest, context: RunContext) -> Any:
    if context.backend_name not in ("torch", "onnx", "tensorrt"):  # onnx, tensorrt: the exported transformer
        raise ParameterError(f"--backend {context.backend_name} does not run SD3 / Flux yet", "use --backend torch")
    model = flow_model_for(context, request.params)
    _check_options(request.params, model.family.label)
    redux.check(request.params, model)
    check_flow_params(request.params, model.family.arch, model.family.label)
    if _given(request, "control") and _given(request, "hires") and request.params["hires"] > 1.0:
        raise ParameterError("--hires with --control is not supported for these models yet", "drop one of them")
    reference = _given(request, "reference")
    if reference and _given(request, "true_cfg"):  # Redux lengthens the prompt past the negative's tokens
        raise ParameterError("--true-cfg does not run with --reference (Flux Redux) yet", "drop one of them")
    if context.backend_name != "torch":  # the export is the plain transformer: no Fill inputs, no Redux bias
        extra = (
            "a Flux Fill model" if model.family.inpainting
            else "--reference" if reference
            else "--control" if _given(request, "control")
            else ""
        )  # fmt: skip
        if extra:
            raise ParameterError(f"--backend {context.backend_name} does not run {extra} yet", "use --backend torch")
    return model


def _given(request: TaskRequest, name: str) -> bool:
    """Whether the request sets ``name`` (a parameter of some of these tasks only)."""
    return name in request.params and bool(request.params[name])


def generate(request: TaskRequest, context: RunContext) -> TaskResult:
    from difftool.core.images import to_pil
    from difftool.plugins.builtin.flow import pipeline
    from difftool.plugins.builtin.sd.models import split_loras
    from difftool.plugins.builtin.sd.pipeline import to_numpy

    params = request.params
    model = _checked_model(request, context)
    label = model.family.label
    if model.family.inpainting:
        raise ParameterError(f"{model.name} is a {label} model", "pass a Flux.1 dev or schnell model to generate")
    width = params["width"] or model.family.native_size
    height = params["height"] or model.family.native_size
    pipeline.check_size(model, width, height)
    guidance = float(params["guidance_scale"])
    prompt = split_loras(str(params["prompt"] or ""))[0]  # the <lora:...> tags were merged at load
    text = pipeline.encode(model, prompt, params["negative_prompt"] or "", guidance, context, params["true_cfg"])
    text = redux.attach(model, text, params, context)  # a --reference's Redux tokens
    scheduler = run_scheduler(params["scheduler"], label)  # flow-euler unless a flow scheduler is named
    size = (width, height)
    from difftool.plugins.builtin.flow.controlled import controls_for

    controls = controls_for(params, model, context, size, guidance)  # VAE-encoded before the noise, as diffusers
    latents = pipeline.sample_latents(model, text, context, size=size, steps=int(params["steps"]), scheduler=scheduler,
                                      shift=params["shift"], controls=controls)  # fmt: skip
    record = {"task": "generate", "size": f"{width}x{height}", "scheduler": scheduler, **model.record()}
    record |= shift_record(model, params["shift"], size)
    if params["hires"] and params["hires"] > 1.0:  # A1111's hires fix: a second, img2img pass
        from difftool.plugins.builtin.flow.hires import second_pass

        latents, hires_record = second_pass(model, latents, text, params, context, size, scheduler)
        record |= hires_record
        if params["shift"] is None and model.scheduler_config.get("use_dynamic_shifting"):
            del record["shift"]  # Flux dev's shift follows the size: the passes differ, and one value would not
            # reproduce the image (a fixed --shift would apply to both)
    image = pipeline.decode(model, latents, context)
    if model.family.guidance_embeds:
        record["distilled_guidance"] = guidance  # Forge's "Distilled CFG Scale"; a CFG batch only with --true-cfg
    return TaskResult([to_pil(to_numpy(image))], record)


class DiffusionModelsSource(ModelSource):
    """Transformer-only files in ComfyUI's ``models/diffusion_models`` and ``models/unet`` under each root."""

    name = "diffusion-models"

    def find(self) -> list[ModelEntry]:
        from difftool.plugins.builtin.flow.loader import is_flow_model
        from difftool.plugins.builtin.models import model_roots as roots

        found = []
        for root in roots():
            for sub in DIFFUSION_FOLDERS:
                folder = root / sub
                if not folder.is_dir():
                    continue
                for child in sorted(folder.iterdir()):
                    family = is_flow_model(child) if child.suffix.lower() in (".safetensors", ".gguf") else None
                    if family is not None:
                        found.append(ModelEntry(child.stem, child, family.name, str(root)))
        return found


@hookimpl
def register_families(register: Callable[[ModelFamily], None]) -> None:
    register(FlowFamilies())


@hookimpl
def register_schedulers(register: Callable[..., None]) -> None:
    register(SCHEDULER, flow_euler, label="Euler (flow)", summary="flow-matching Euler with shift (SD3, Flux only)")
    for name, (label, factory, summary) in FLOW_SAMPLERS.items():
        register(name, factory, label=label, summary=summary)


@hookimpl
def register_models(register: Callable[[ModelSource], None]) -> None:
    register(DiffusionModelsSource())
