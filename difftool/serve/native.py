"""The native ``/v1`` API: tasks, models, schedulers and backends as JSON, and jobs.

Each task's parameters are published as JSON Schema generated from its declaration (:func:`param_schema`),
in ``GET /v1/tasks`` and in the OpenAPI document (``/openapi.json``, shown at ``/docs``), so a plugin's
task appears here without any server code.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from difftool.app.plan import param_choices
from difftool.core.errors import ParameterError
from difftool.core.task import Param, RegistryView, Task
from difftool.serve.errors import body_error
from difftool.serve.job_queue import FINAL_STATES, Job
from difftool.serve.server import MAX_COUNT, Server

router = APIRouter(prefix="/v1", tags=["native"])

_JSON_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "string": "string", "path": "string"}
_JSON_TYPES["model"] = "string"  # a listed name or a path (the server's policy applies)
#: An image or mask: base64 bytes (a ``data:`` URL prefix is allowed), or a path inside an --allow-path folder.
IMAGE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/*"},
        {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
    ]
}


def param_schema(param: Param, registry: RegistryView) -> dict[str, Any]:
    """One declared parameter as JSON Schema (type, range, choices, default, help)."""
    if param.type in ("image", "mask"):
        schema: dict[str, Any] = {**IMAGE_SCHEMA, "x-difftool-type": param.type}
    elif param.type == "choice":
        choices = list(param_choices(param, registry))
        schema = {"enum": choices}
        kinds = {type(c) for c in choices}
        if kinds == {int}:
            schema["type"] = "integer"
        elif kinds == {str}:
            schema["type"] = "string"
    else:
        schema = {"type": _JSON_TYPES[param.type]}
        if param.type == "path":
            schema["format"] = "path"
        if param.type == "model":  # what the GUI's model picker offers: listed models of these families
            schema |= {"x-difftool-type": "model", "x-difftool-families": list(param.families)}
            schema["x-difftool-keywords"] = list(param.keywords)
    if param.min is not None:
        schema["minimum"] = param.min
    if param.max is not None:
        schema["maximum"] = param.max
    if param.multiple:  # a list of values (or one per line); a parsed parameter also takes objects
        items = {"anyOf": [schema, {"type": "object"}]} if param.parse is not None else schema
        schema = {"type": "array", "items": items}
    if param.default is not None:
        schema["default"] = param.default
    if param.help:
        schema["description"] = param.help
    return schema


def task_schema(task: Task, registry: RegistryView) -> dict[str, Any]:
    """A task's parameters as one JSON Schema object."""
    return {
        "title": f"{task.name} parameters",
        "type": "object",
        "properties": {p.name: param_schema(p, registry) for p in task.params},
        "required": [p.name for p in task.params if p.required],
        "additionalProperties": False,
    }


def describe_task(name: str, registry: RegistryView) -> dict[str, Any]:
    task = registry.task(name)
    return {
        "name": name,
        "summary": task.summary,
        "plugin": registry.task_plugin(name),
        "uses_model": task.uses_model,
        "ready": task.availability(None) is None,
        "inputs": [{"name": p.name, "kind": p.kind, "help": p.help} for p in task.inputs],
        "outputs": [{"name": p.name, "kind": p.kind, "help": p.help} for p in task.outputs],
        "params": task_schema(task, registry),
    }


def add_task_schemas(app: FastAPI, server: Server) -> None:
    """Put every task's parameter schema into the OpenAPI document (components ``<task>Params``)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas["JobRequest"] = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            for name in sorted(server.registry.tasks):
                schemas[f"{name}Params"] = task_schema(server.registry.task(name), server.registry)
            document_errors(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


#: What every route may answer besides its success, with the server's one error shape ``{"error": "..."}``.
ERROR_STATUSES = {
    "401": "missing or wrong API token (with --api-token)",
    "403": "a path outside the --allow-path folders, or a pickle",
    "404": "no such job or task",
    "409": "the job is not done, or was cancelled",
    "413": "the body, an image or the requested outputs are over the server's limits",
    "422": "a parameter, field or image the request got wrong (the message names it)",
    "429": "the queue is full (see Retry-After)",
    "500": "a bug: the server log has the traceback",
    "503": "the server is shutting down (see Retry-After)",
}


def document_errors(document: dict[str, Any]) -> None:
    """Make the OpenAPI document say what the server sends: errors as ``{"error": "..."}`` (never FastAPI's
    ``{"detail": [...]}``) on every route, and the events route as ``text/event-stream``."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Error"] = {
        "type": "object",
        "properties": {"error": {"type": "string", "description": "one line: the problem and the fix"}},
        "required": ["error"],
    }
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, description in ERROR_STATUSES.items():
                responses[status] = {"description": description, "content": error}
            if path.endswith("/events"):
                responses["200"] = {
                    "description": "Server-Sent Events: progress, preview, then done, failed or cancelled",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                }


class JobRequest(BaseModel):
    """``POST /v1/jobs`` as JSON. Images are base64 (or ``{"path": ...}`` with --allow-path)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    task: str = Field(description="a task name from GET /v1/tasks")
    inputs: dict[str, Any] | list[Any] = Field(default_factory=list, description="the task's declared inputs")
    params: dict[str, Any] = Field(default_factory=dict, description="see components <task>Params")
    model: str | None = Field(default=None, description="a name from GET /v1/models (default: the task's)")
    backend: str | None = Field(default=None, description="a name from GET /v1/backends (default: torch)")
    dtype: str | None = Field(default=None, description="auto, fp32, fp16 or bf16")
    seed: int | None = Field(default=None, ge=-1, le=2**63 - 1, description="-1 or absent: random")
    count: int = Field(default=1, ge=1, le=MAX_COUNT, description="outputs, with seeds SEED, SEED+1, ...")
    preview_every: int = Field(default=0, ge=0, le=10_000, description="a preview event every N steps (0: none)")


def _server(request: Request) -> Server:
    return request.app.state.server


def _job(request: Request, job_id: str) -> Job:
    job = _server(request).queue.get(job_id)
    if job is None:
        keep = _server(request).settings.keep_jobs
        raise HTTPException(404, f"no job {job_id!r}; the server keeps the last {keep} finished jobs")
    return job


@router.get("/tasks")
def list_tasks(request: Request) -> dict[str, Any]:
    """Every task with its inputs, outputs and parameters (JSON Schema)."""
    registry = _server(request).registry
    return {"tasks": [describe_task(name, registry) for name in sorted(registry.tasks)]}


@router.get("/tasks/{name}")
def get_task(request: Request, name: str) -> dict[str, Any]:
    registry = _server(request).registry
    if name not in registry.tasks:
        raise HTTPException(404, f"no task {name!r}; GET /v1/tasks lists them")
    return describe_task(name, registry)


@router.get("/models")
def list_models(request: Request) -> dict[str, Any]:
    """Models the server's model sources list (names only: server paths are not disclosed)."""
    found = _server(request).registry.find_models()
    return {"models": [{"name": m.name, "family": m.family} for m in found]}


@router.get("/schedulers")
def list_schedulers(request: Request) -> dict[str, Any]:
    entries = _server(request).registry.schedulers.values()
    return {
        "schedulers": [{"name": e.name, "label": e.label, "plugin": e.plugin, "summary": e.summary} for e in entries]
    }


@router.get("/backends")
def list_backends(request: Request) -> dict[str, Any]:
    server = _server(request)
    rows = []
    for name, entry in sorted(server.registry.backends.items()):
        devices = {d: entry.value.unavailable_reason(d) or "ready" for d in server.settings.devices}
        rows.append({"name": name, "plugin": entry.plugin, "summary": entry.value.summary, "devices": devices})
    return {"backends": rows}


@router.post(
    "/jobs",
    status_code=202,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "description": "fields task, params (JSON text), model, backend, dtype, seed, count; "
                        "one file per image input or image parameter, named after it",
                    }
                },
            }
        }
    },
)
async def create_job(request: Request) -> JSONResponse:
    """Queue a job; answers 202 with its id (poll GET /v1/jobs/{id}, or stream its events)."""
    server = _server(request)
    body = await _read_job_request(request)
    job = await run_in_threadpool(
        server.make_job,
        body.task,
        body.inputs,
        body.params,
        model=body.model,
        backend=body.backend,
        dtype=body.dtype,
        seed=body.seed,
        count=body.count,
        preview_every=body.preview_every,
    )
    server.submit(job)
    return JSONResponse(job.status(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


async def _read_job_request(request: Request) -> JobRequest:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        async with request.form() as form:  # closes Starlette's spooled temporary files at once
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            files = {k: await v.read() for k, v in form.items() if not isinstance(v, str)}
        try:
            params = json.loads(fields.pop("params", "{}") or "{}")
        except (ValueError, RecursionError) as error:
            raise ParameterError(f"the params field: {body_error(error)}", 'send params as {"name": value}') from None
        if not isinstance(params, dict):
            raise ParameterError("the params field is not a JSON object", 'send params as {"name": value}')
        task = request.app.state.server.registry.task(fields.get("task", ""))
        ports = {p.name for p in task.inputs}
        inputs = {k: v for k, v in files.items() if k in ports}
        params.update({k: v for k, v in files.items() if k not in ports})
        return _validated({**fields, "inputs": inputs, "params": params})
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, nested past Python's stack
        raise ParameterError(body_error(error)) from None
    return _validated(body)


def _validated(body: Any) -> JobRequest:
    try:
        return JobRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        raise ParameterError(f"{where}: {first.get('msg', 'invalid')}", "see JobRequest in /openapi.json") from None


@router.get("/jobs/{job_id}")
def get_job(request: Request, job_id: str) -> dict[str, Any]:
    """State, progress (0..1), ETA, error, and each finished output's record."""
    return _job(request, job_id).status()


@router.delete("/jobs/{job_id}")
def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    """Cancel: a waiting job never starts; a running one stops within one step."""
    job = _job(request, job_id)
    if job.state not in FINAL_STATES:
        _server(request).queue.cancel(job)
    return job.status()


@router.get("/jobs/{job_id}/events")
async def job_events(request: Request, job_id: str) -> StreamingResponse:
    """Server-Sent Events: ``progress`` on every change, ``preview`` (base64 PNG) when the job asked for previews,
    then one ``done``, ``failed`` or ``cancelled``."""
    job = _job(request, job_id)

    async def stream() -> Any:
        version, preview, quiet = -1, None, 0.0
        while True:
            state, current = job.state, job.version
            if job.preview is not None and job.preview is not preview:
                preview = job.preview
                data = {"step": job.preview_step, "image": base64.b64encode(preview).decode("ascii")}
                yield f"event: preview\ndata: {json.dumps(data)}\n\n"
            if current != version:
                version = current
                event = state if state in FINAL_STATES else "progress"
                yield f"event: {event}\ndata: {json.dumps(job.status())}\n\n"
            if state in FINAL_STATES or await request.is_disconnected():
                return
            await asyncio.sleep(0.05)
            quiet = 0.0 if current != job.version else quiet + 0.05
            if quiet >= 1.0:  # a comment line while the job loads or waits: clients see the stream is alive
                quiet = 0.0
                yield ": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/jobs/{job_id}/result", response_class=FileResponse)
def job_result(request: Request, job_id: str, index: int = 0) -> FileResponse:
    """Output ``index`` as PNG, with the metadata the CLI writes (A1111 ``parameters`` and ``difftool``)."""
    job = _job(request, job_id)
    if job.state != "done":
        raise HTTPException(409, f"job {job_id} is {job.state}{': ' + job.error if job.error else ''}; no result")
    if not 0 <= index < len(job.files):
        raise HTTPException(404, f"job {job_id} has outputs 0 to {len(job.files) - 1}; pass ?index= in that range")
    seeds = getattr(job, "file_seeds", [])  # a Ray replica's job may not carry them
    seed = seeds[index] if index < len(seeds) else job.seeds[0]
    return FileResponse(job.files[index], media_type="image/png", filename=f"{job.task}-{seed}-{index}.png")
