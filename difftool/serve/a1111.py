"""The AUTOMATIC1111 ``/sdapi/v1`` subset that integrations use (``webuiapi``, Krita and Photoshop plugins).

Requests become ordinary difftool jobs (``generate``, ``style``, ``inpaint``, ``superres``) in the same
queue as ``/v1/jobs``; a request waits for its job and answers in A1111's response shapes. A client
that disconnects cancels its job. The mapping, and what is refused, is in :mod:`difftool.serve.a1111_map`
and docs/serve.md.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from difftool.core.errors import DifftoolError, ParameterError
from difftool.core.images import LoadedImage, check_pixels, open_image
from difftool.serve.a1111_controlnet import controlnet_units
from difftool.serve.a1111_map import (
    SUPPORTED_OPTIONS,
    ExtrasSingleImageRequest,
    Img2ImgRequest,
    Txt2ImgRequest,
    check_supported,
    forge_params,
    hires_params,
    inpaint_params,
    prompt_params,
    refiner_params,
    refuse,
    upscale_scale,
)
from difftool.serve.a1111_reference import reference_params
from difftool.serve.job_queue import SHUTDOWN, Job
from difftool.serve.security import PIXELS_FIX
from difftool.serve.server import MAX_COUNT, Server
from difftool.serve.sink import png_bytes

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])

#: HTTP status of a failed job, by the error's type (the rest are the server's: 500).
_JOB_ERROR_STATUS = {
    "ParameterError": 422,
    "ImageError": 422,
    "ModelError": 422,
    "BackendUnavailableError": 422,
    "ImageTooLargeError": 413,
}
UPSCALER_FAMILIES = ("difftool-superres", "upscaler")


class JobFailed(DifftoolError):
    """A job the request waited for failed; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


def _server(request: Request) -> Server:
    return request.app.state.server


async def _wait(request: Request, server: Server, job: Job) -> Job:
    """Wait for ``job``; a client that goes away cancels it."""
    server.submit(job)
    cancelled = False
    # Waited for in a worker thread (the event loop never blocks), a quarter second at a time between
    # checks that the client is still there; the answer goes out as soon as the job ends.
    while not await run_in_threadpool(job.done.wait, 0.25):
        if not cancelled and await request.is_disconnected():
            server.queue.cancel(job)
            cancelled = True
        if server.queue.overdue():  # shutting down, and the job has not stopped yet: answer without it
            raise JobFailed("the server shut down before the job finished; retry shortly", 503, retry_after=30)
    if job.error_type == SHUTDOWN:
        raise JobFailed(f"{job.error}; retry shortly (or on another server)", 503, retry_after=30)
    if job.state == "cancelled":
        raise JobFailed("the job was interrupted before it finished; difftool returns no partial image", 409)
    if job.state != "done":
        raise JobFailed(job.error, _JOB_ERROR_STATUS.get(job.error_type, 500))
    return job


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _model_name(server: Server, title: str | None) -> str:
    """A checkpoint title as A1111 clients send it (``name``, ``name.safetensors``, ``name [hash]``)."""
    if not title:
        raise ParameterError(
            "no Stable Diffusion checkpoint is selected",
            "POST /sdapi/v1/options with sd_model_checkpoint (GET /sdapi/v1/sd-models lists them)",
        )
    name = title.split(" [")[0].strip()
    known = {m.name: m for m in server.sd_models()}
    for candidate in (name, name.rsplit(".", 1)[0]):
        if candidate in known:
            return candidate
    raise ParameterError(f"unknown checkpoint {title!r}", "GET /sdapi/v1/sd-models lists them")


def _info(job: Job, req: Txt2ImgRequest, model: str, extra: dict[str, Any]) -> str:
    """A1111's ``info``: a JSON text with the seeds, sizes and infotexts of the images."""
    from difftool.core.metadata import format_parameters

    records = job.records
    first = records[0] if records else {}
    width, height = req.width, req.height
    if job.files:
        with Image.open(job.files[0]) as first_image:
            width, height = first_image.size
    return json.dumps(
        {
            "prompt": req.prompt,
            "all_prompts": [req.prompt] * len(records),
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * len(records),
            "seed": job.seeds[0],
            "all_seeds": job.seeds,
            "subseed": job.seeds[0],
            "all_subseeds": job.seeds,
            "width": width,
            "height": height,
            "sampler_name": first.get("scheduler_label") or first.get("scheduler"),
            "cfg_scale": req.cfg_scale,
            "steps": req.steps,
            "batch_size": req.batch_size,
            "n_iter": req.n_iter,
            "clip_skip": first.get("clip_skip", 1),
            "sd_model_name": model,
            "index_of_first_image": 0,
            "infotexts": [format_parameters(r) for r in records],
            "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
            **extra,
        }
    )


def _images(job: Job, req: Txt2ImgRequest) -> list[str]:
    return [_b64(path.read_bytes()) for path in job.files] if req.send_images else []


def _count(req: Txt2ImgRequest) -> int:
    count = req.batch_size * req.n_iter
    if count > MAX_COUNT:
        raise refuse("batch_size x n_iter", f"{count} images is over the server's {MAX_COUNT} per request")
    return count


async def _run(
    request: Request,
    server: Server,
    req: Txt2ImgRequest,
    task: str,
    inputs: list[Any],
    params: dict[str, Any],
    model: str,
) -> Job:
    """Queue ``task`` for the request's images (batch x iterations, seeds from its seed) and wait for it."""
    job = await run_in_threadpool(
        server.make_job, task, inputs, params, model=model, seed=req.seed, count=_count(req),
        preview_every=_preview_every(server, req),
    )  # fmt: skip
    return await _wait(request, server, job)


def _checked(server: Server, req: Txt2ImgRequest) -> tuple[str, dict[str, Any]]:
    """A txt2img/img2img request refused if it asks for what difftool cannot do; its model and prompt params."""
    check_supported(req)
    checkpoint = (req.override_settings or {}).get("sd_model_checkpoint") or server.options["sd_model_checkpoint"]
    clip_skip = server.options.get("CLIP_stop_at_last_layers")
    params = prompt_params(req, server.registry, clip_skip)
    deprecated = (req.model_extra or {}).get("controlnet_units")  # webuiapi's use_deprecated_controlnet
    scripts = {**req.alwayson_scripts, **({"controlnet": {"args": deprecated}} if deprecated else {})}
    units = controlnet_units(scripts)
    if units:
        params["control"] = units
    params |= reference_params(scripts, server.policy)  # an IP-Adapter unit: reference, ip_adapter, weight
    name = _model_name(server, checkpoint)
    params |= forge_params(req, next((m.family for m in server.sd_models() if m.name == name), ""))
    return name, params


@router.post("/txt2img")
async def txt2img(request: Request, req: Txt2ImgRequest) -> dict[str, Any]:
    """Text to image: the ``generate`` task."""
    server = _server(request)
    model, params = _checked(server, req)
    params |= {"width": req.width, "height": req.height, **hires_params(req), **refiner_params(req, server.refiners())}
    job = await _run(request, server, req, "generate", [], params, model)
    return {"images": _images(job, req), "parameters": req.model_dump(), "info": _info(job, req, model, {})}


def _init_image(server: Server, req: Img2ImgRequest) -> LoadedImage:
    if not req.init_images:
        raise ParameterError("init_images is empty", "send one base64 image in init_images")
    if len(req.init_images) > 1:
        raise refuse("init_images", "difftool takes one init image per request")
    image = server.load_image(req.init_images[0], "init_images[0]")
    if image.size == (req.width, req.height):
        return image
    if req.resize_mode != 0:
        raise refuse("resize_mode", "only 0 (just resize) is supported when width/height differ from the image")
    # Before Pillow allocates it:
    check_pixels(req.width, req.height, "img2img width x height", server.settings.max_pixels, PIXELS_FIX)
    return open_image(image.to_pil().convert("RGBA" if image.alpha is not None else "RGB").resize(
        (req.width, req.height), Image.Resampling.LANCZOS))  # fmt: skip


def _mask(server: Server, req: Img2ImgRequest) -> LoadedImage:
    mask = server.load_image(req.mask, "mask")
    if req.inpainting_mask_invert:  # A1111: the grey (or alpha) mask inverted, its soft edges kept
        grey = mask.alpha if mask.alpha is not None else mask.rgb.mean(axis=2)
        mask = open_image(Image.fromarray(np.round(255 - grey * 255).astype("uint8"), "L"))
    return mask


@router.post("/img2img")
async def img2img(request: Request, req: Img2ImgRequest) -> dict[str, Any]:
    """Image to image: ``style`` (no mask) or ``inpaint`` (with ``mask``)."""
    server = _server(request)
    model, params = _checked(server, req)
    refine = refiner_params(req, server.refiners())
    image = await run_in_threadpool(_init_image, server, req)
    if req.mask:
        if refine:
            raise refuse("refiner_checkpoint", "difftool's SDXL refiner runs with txt2img and img2img, not inpainting")
        task = "inpaint"
        params.update(inpaint_params(req), mask=await run_in_threadpool(_mask, server, req))
    else:
        task = "style"
        if not req.prompt:
            raise ParameterError("img2img without a mask needs a prompt", "send the prompt to restyle towards")
        if req.denoising_strength < 0.01:
            raise refuse("denoising_strength", f"{req.denoising_strength:g} is below difftool's minimum 0.01")
        params |= {"strength": min(1.0, req.denoising_strength), **refine}
    job = await _run(request, server, req, task, [image], params, model)
    info = _info(job, req, model, {"denoising_strength": req.denoising_strength})
    # A1111 echoes the init image and mask only when asked (include_init_images), as clients expect.
    parameters = req.model_dump(exclude=None if req.include_init_images else {"init_images", "mask"})
    return {"images": _images(job, req), "parameters": parameters, "info": info}


@router.post("/extra-single-image")
async def extra_single_image(request: Request, req: ExtrasSingleImageRequest) -> dict[str, Any]:
    """Upscale: the ``superres`` task with the model ``upscaler_1`` names."""
    server = _server(request)
    superres = server.registry.task("superres")
    scale = upscale_scale(req, superres.param("scale").choices)
    image = await run_in_threadpool(server.load_image, req.image, "image")
    if req.upscaler_1 in ("None", "") or scale == 1:  # A1111 leaves the image as it is then
        unchanged = _b64(png_bytes(image.to_pil()))
        return {"html_info": "<p>no upscaling asked for; image unchanged</p>", "image": unchanged}
    model = None if req.upscaler_1 == "difftool" else req.upscaler_1
    target = (image.width * scale, image.height * scale)
    check_pixels(*target, "the upscaled image", server.settings.max_pixels, PIXELS_FIX)
    # As A1111 does: the upscaler runs until the image reaches the target (the embedded model by 2 or 4, a
    # community model by its own scale), then a Lanczos resize lands on it exactly (3x: 4x, then down).
    data, passes = png_bytes(image.to_pil()), 0
    while image.width < target[0] and passes < 3:
        left = target[0] / image.width
        params = {"scale": 2 if left <= 2 else 4} if model is None else {}
        job = await run_in_threadpool(
            server.make_job, "superres", [image], params, model=model, model_families=UPSCALER_FAMILIES
        )
        job = await _wait(request, server, job)
        data, passes = job.files[0].read_bytes(), passes + 1
        image = await run_in_threadpool(server.load_image, data, "the upscaled image")
    if image.size != target:
        data = png_bytes(image.to_pil().resize(target, Image.Resampling.LANCZOS))
    text = f"<p>Upscale: {scale}, upscaler: {req.upscaler_1}</p>"
    return {"html_info": text, "image": _b64(data) if req.show_extras_results else None}


@router.get("/progress")
def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    """The running job's progress (0 when idle), in A1111's ProgressResponse shape."""
    queue = _server(request).queue
    running = queue.running()
    job = running[0] if running else None
    state = {
        "skipped": False,
        "interrupted": bool(job and job.token.cancelled),
        "job": job.task if job else "",  # never the id: a /v1 job id is the capability to read and cancel it
        "job_count": queue.waiting() + len(running),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)) if job else "0",
        "job_no": job.index if job else 0,
        "sampling_step": job.step if job else 0,
        "sampling_steps": job.total if job else 0,
    }
    eta = job.eta() if job else None
    fraction = job.progress() if job else 0.0
    image = _b64(job.preview) if job and job.preview and not skip_current_image else None
    return {"progress": fraction, "eta_relative": eta or 0.0, "state": state, "current_image": image, "textinfo": None}


@router.post("/interrupt")
def interrupt(request: Request) -> dict[str, Any]:
    """Stop the running job(s) within one step (queued jobs go on, as in A1111)."""
    queue = _server(request).queue
    for job in queue.running():
        queue.cancel(job)
    return {}


@router.get("/sd-models")
def sd_models(request: Request) -> list[dict[str, Any]]:
    """Stable Diffusion checkpoints the model folders hold (names only: no server paths)."""
    return [
        {"title": m.name, "model_name": m.name, "hash": None, "sha256": None, "filename": m.name, "config": None}
        for m in _server(request).sd_models()
    ]


@router.get("/samplers")
def samplers(request: Request) -> list[dict[str, Any]]:
    """difftool's schedulers under their A1111 names; ``aliases`` holds the difftool name."""
    entries = _server(request).registry.schedulers.values()
    return [{"name": e.label, "aliases": [e.name], "options": {}} for e in entries]


@router.get("/schedulers")
def schedulers(request: Request) -> list[dict[str, Any]]:
    """A1111 1.9's schedule types difftool honours: Automatic, and Karras where a sampler has it."""
    labels = [e.label for e in _server(request).registry.schedulers.values()]
    kinds = [("automatic", "Automatic")] + [("karras", "Karras")] * any(x.endswith(" Karras") for x in labels)
    kinds += [("simple", "Simple"), ("beta", "Beta")] * ("Euler Beta (flow)" in labels)  # Forge's, for SD3 / Flux
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": None, "need_inner_model": None}
        for name, label in kinds
    ]


@router.get("/upscalers")
def upscalers(request: Request) -> list[dict[str, Any]]:
    """``None``, ``difftool`` (the embedded superres model) and the superres/upscaler models found."""
    found = [m for m in _server(request).registry.find_models() if m.family in UPSCALER_FAMILIES]
    rows = [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]
    rows.append({"name": "difftool", "model_name": "embedded", "model_path": None, "model_url": None, "scale": 4})
    rows += [
        {"name": m.name, "model_name": m.family, "model_path": None, "model_url": None, "scale": None} for m in found
    ]
    return rows


@router.get("/scripts")
def scripts() -> dict[str, list[str]]:
    """No A1111 scripts or extensions (clients probe this at start)."""
    return {"txt2img": [], "img2img": []}


@router.get("/options")
def get_options(request: Request) -> dict[str, Any]:
    server = _server(request)
    defaults = {"CLIP_stop_at_last_layers": 1, "show_progress_every_n_steps": 0}
    return {**defaults, **server.options, "samples_format": "png"}


@router.post("/options")
def set_options(request: Request, options: dict[str, Any]) -> dict[str, Any]:
    """Set ``sd_model_checkpoint`` (a name from /sd-models) and ``CLIP_stop_at_last_layers``; others: 422."""
    server = _server(request)
    unknown = sorted(set(options) - set(SUPPORTED_OPTIONS))
    if unknown:
        raise refuse(unknown[0], f"option not supported (supported: {', '.join(SUPPORTED_OPTIONS)})")
    if "sd_model_checkpoint" in options:
        server.options["sd_model_checkpoint"] = _model_name(server, options["sd_model_checkpoint"])
    for name, low, high in (("CLIP_stop_at_last_layers", 1, 12), ("show_progress_every_n_steps", 0, 10_000)):
        if name in options:
            server.options[name] = _int_option(options, name, low, high)
    return {}


def _int_option(options: dict[str, Any], name: str, low: int, high: int) -> int:
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise refuse(name, f"{value!r} is not an integer in [{low}, {high}]")
    return value


def _preview_every(server: Server, req: Txt2ImgRequest) -> int:
    """A1111's live preview period (``show_progress_every_n_steps``) for this request; 0: no previews."""
    merged = {"show_progress_every_n_steps": 0, **server.options, **(req.override_settings or {})}
    return _int_option(merged, "show_progress_every_n_steps", 0, 10_000)
