"""The desktop app on a ``difftool serve`` server: tasks, models and backends from its ``/v1`` API, jobs
run there with progress and previews from its event stream.

:class:`RemoteRegistry` stands where the window's local plugin registry stands: both implement
:class:`~difftool.core.task.RegistryView` (the task panel and the forms read the same attributes), so
an artist's laptop drives the team's GPU box with the same window. Only the standard library talks
HTTP here: the app needs no server packages.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from difftool.core.errors import BackendUnavailableError, Cancelled, DifftoolError, ParameterError
from difftool.core.models import ModelEntry
from difftool.core.task import CancelToken, Entry, Param, Port

_TYPES = {"integer": "int", "number": "float", "boolean": "bool", "string": "string"}


def param_from_schema(name: str, schema: dict[str, Any], required: bool) -> Param:
    """A declared parameter back from the server's JSON Schema (``GET /v1/tasks``)."""
    multiple = schema.get("type") == "array"
    if multiple:  # a repeatable parameter (ControlNet units): its items say the type
        items = schema.get("items", {})
        item = next((s for s in items.get("anyOf", [items]) if s.get("type") != "object"), {"type": "string"})
        schema = {**item, **{k: v for k, v in schema.items() if k in ("default", "description")}}
    kind = schema.get("x-difftool-type") or (
        "choice" if "enum" in schema else "path" if schema.get("format") == "path" else _TYPES[schema["type"]]
    )
    return Param(
        name,
        kind,
        default=schema.get("default"),
        min=schema.get("minimum"),
        max=schema.get("maximum"),
        choices=tuple(schema.get("enum", ())),
        help=schema.get("description", ""),
        required=required,
        multiline="prompt" in name or multiple,
        multiple=multiple,
        families=tuple(schema.get("x-difftool-families", ())),
        keywords=tuple(schema.get("x-difftool-keywords", ())),
    )


class RemoteTask:
    """What the window reads of a task, built from the server's description of it."""

    model_families = None

    def __init__(self, description: dict[str, Any]) -> None:
        schema = description["params"]
        required = set(schema.get("required", ()))
        self.name: str = description["name"]
        self.summary: str = description["summary"]
        self.uses_model: bool = description["uses_model"]
        self.params = tuple(param_from_schema(n, s, n in required) for n, s in schema["properties"].items())
        self.inputs = tuple(Port(p["name"], p["kind"], p.get("help", "")) for p in description["inputs"])
        self.outputs = tuple(Port(p["name"], p["kind"], p.get("help", "")) for p in description["outputs"])

    def __call__(self) -> RemoteTask:  # the registry hands out instances; one description serves
        return self

    def availability(self, model: str | None) -> str | None:
        return None  # the server checks the request when the job is submitted

    def accepts_family(self, family: str) -> bool:
        return self.uses_model

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)


class RemoteBackend:
    options = ()
    recorded = ()

    def __init__(self, name: str, info: dict[str, Any]) -> None:
        self.name, self.info = name, info
        self.summary = f"{name} on the server"

    def unavailable_reason(self, device: str = "cpu") -> str | None:
        reason = self.info.get("devices", {}).get(device, f"the server has no {device} worker")
        return None if reason == "ready" else reason


class RemoteRegistry:
    """A server's tasks, models and backends, read once when the window connects."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        tasks = self._json("GET", "/v1/tasks")["tasks"]
        self.tasks = {t["name"]: Entry(RemoteTask(t), t.get("plugin", "server")) for t in tasks}
        self.models = [m for m in self._json("GET", "/v1/models")["models"]]
        rows = self._json("GET", "/v1/backends")["backends"]
        self.backends = {row["name"]: Entry(RemoteBackend(row["name"], row), "server") for row in rows}
        #: The server's workers' devices (the device box offers these, not this machine's GPUs).
        self.devices = list(rows[0]["devices"]) if rows else ["cpu"]
        self.last_job = ""  # the server's id of the last job submitted (for logs and bug reports)
        self.failures: list[Any] = []
        self.plugins: dict[str, Any] = {}
        self.schedulers: dict[str, Any] = {}
        self.preprocessors: dict[str, Any] = {}

    # --- what the window asks of a registry ----------------------------------------------------
    def task(self, name: str) -> RemoteTask:
        entry = self.tasks.get(name)
        if entry is None:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise ParameterError(f"the server at {self.url} has no task {name!r} (available: {known})")
        return entry.value

    def task_plugin(self, name: str) -> str:
        return self.tasks[name].plugin

    def backend(self, name: str) -> RemoteBackend:
        entry = self.backends.get(name)
        if entry is None:
            known = ", ".join(sorted(self.backends)) or "none"
            raise BackendUnavailableError(f"the server at {self.url} has no backend {name!r}", f"use one of {known}")
        return entry.value

    def make_scheduler(self, name: str, config: Mapping[str, Any]) -> Any:
        raise DifftoolError(f"scheduler {name!r} runs on the server at {self.url}, not here")

    def preprocessor(self, name: str) -> Any:
        raise DifftoolError(f"preprocessor {name!r} runs on the server at {self.url}, not here")

    def find_models(self) -> list[ModelEntry]:
        return [ModelEntry(m["name"], Path(m["name"]), m.get("family", ""), self.url) for m in self.models]

    def delegated_families(self, task: str) -> tuple[str, ...]:
        return ()  # the server resolves its own models

    def family_for(self, path: Any, task: str) -> None:
        return None  # and applies their families' defaults

    # --- running ---------------------------------------------------------------------------------
    def run(
        self,
        task: str,
        inputs: list[Any],
        params: dict[str, Any],
        options: dict[str, Any],
        progress: Callable[[int, int, Any], None],
        cancel: CancelToken,
        preview_every: int = 0,
    ) -> Any:
        """Submit the job, follow its events (progress, previews), fetch the result; a cancel deletes it."""
        from difftool.app.api import RunResult
        from difftool.core.images import read_metadata

        body = {
            "task": task,
            "inputs": [_encoded(i) for i in inputs],
            "params": {k: _encoded(v) if isinstance(v, (Image.Image, Path)) else v for k, v in params.items()},
            "seed": options.get("seed"),
            "model": options.get("model"),
            "preview_every": preview_every,
        }
        if options.get("backend"):
            body |= {"backend": options["backend"], "dtype": options.get("dtype")}
        job = self.last_job = self._json("POST", "/v1/jobs", body)["id"]
        total = 0
        try:  # whatever ends this early (cancel, a lost connection), the server's job is deleted
            for event, data in self._events(f"/v1/jobs/{job}/events"):
                if cancel.cancelled:
                    raise Cancelled()
                if event == "progress" and data.get("total"):
                    total = int(data["total"])
                    progress(int(data.get("step") or 0), total, None)
                elif event == "preview" and total:
                    preview = Image.open(io.BytesIO(base64.b64decode(data["image"])))
                    progress(int(data.get("step") or 0), total, preview)
                elif event in ("failed", "cancelled"):
                    raise DifftoolError(data.get("error") or f"the server's job {job} was {event}")
                elif event == "done":
                    if data.get("total"):  # a job faster than the stream still fills the bar
                        progress(int(data["total"]), int(data["total"]), None)
                    break
        except BaseException:
            try:
                self._json("DELETE", f"/v1/jobs/{job}")
            except DifftoolError:
                pass  # the server is gone: nothing left to cancel
            raise
        png = self._request("GET", f"/v1/jobs/{job}/result").read()
        image = Image.open(io.BytesIO(png))
        image.load()
        return RunResult([image], read_metadata(image).get("difftool", {}))

    # --- HTTP --------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, timeout: float | None = 0) -> Any:
        """``timeout`` 0: the registry's; ``None``: none (an event stream stays open as long as its job)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            wait = self.timeout if timeout == 0 else timeout
            return urllib.request.urlopen(request, timeout=wait)  # noqa: S310 - the URL the user typed
        except urllib.error.HTTPError as error:
            try:
                message = json.loads(error.read()).get("error") or error.reason
            except ValueError:
                message = error.reason
            raise DifftoolError(f"the server at {self.url} answered {error.code}: {message}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise DifftoolError(
                f"cannot reach the server at {self.url}: {reason}", "check the address and that `difftool serve` runs"
            ) from None

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        with self._request(method, path, body) as response:
            return json.loads(response.read() or b"{}")

    def _events(self, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Server-Sent Events as (event, data) pairs; the server's keep-alive comments as ("keep-alive", {}),
        so the caller looks at its cancel token at least once a second."""
        with self._request("GET", path, timeout=None) as response:
            event, lines = "message", []
            for raw in _lines(response, self.url):
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith(":"):
                    yield "keep-alive", {}
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    lines.append(line[5:].strip())
                elif not line and lines:
                    yield event, json.loads("\n".join(lines))
                    event, lines = "message", []


def _encoded(value: Any) -> str:
    """An image (PIL, or a file path) as base64 PNG/file bytes for the server."""
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")
    return base64.b64encode(Path(value).read_bytes()).decode("ascii")


def _lines(response: Any, url: str) -> Iterator[bytes]:
    """The stream's lines; a connection lost midway is one clear error, not a socket traceback."""
    import http.client

    try:
        yield from response
    except (OSError, http.client.HTTPException) as error:
        raise DifftoolError(f"lost the connection to the server at {url}: {error}", "check the server") from None
