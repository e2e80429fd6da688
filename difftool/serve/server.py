"""The server's state (settings, registry, queue, path policy, A1111 options) and how a request becomes a job."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from difftool.app.plan import Plan
from difftool.core.errors import ImageTooLargeError, ParameterError
from difftool.core.images import LoadedImage, check_pixels
from difftool.core.task import RegistryView
from difftool.serve.job_queue import Job, JobQueue
from difftool.serve.security import PIXELS_FIX, PathPolicy, PolicyResolver, check_params, load_image, resolve_model
from difftool.serve.settings import ServeSettings

#: Most outputs one request may ask for (A1111's batch_size x n_iter, the native ``count``).
MAX_COUNT = 16
#: Families of Stable Diffusion checkpoints (what ``/sdapi/v1/sd-models`` lists).
SD_FAMILY_PREFIXES = ("sd1", "sd2", "sdxl", "sd3", "flux")  # SD3 / Flux: the flow family plugin's
#: The family ``difftool models`` gives SDXL refiners (generate's ``refiner``).
REFINER_FAMILIES = ("sdxl-refiner",)


class Server:
    """Everything the routes share; one per application."""

    def __init__(self, settings: ServeSettings, registry: RegistryView | None = None) -> None:
        from difftool.plugins.registry import get_registry

        self.settings = settings
        self.registry = registry or get_registry()
        for device in settings.devices:  # a worker on a device that cannot run would fail every job it takes
            reason = self.registry.backend("torch").unavailable_reason(device)
            if reason:
                raise ParameterError(f"--device {device}: {reason}")
        self.policy = PathPolicy(settings.allow_paths)
        self.queue = JobQueue(settings.devices, settings.queue_size, settings.keep_jobs, settings.abandon_after)
        self.options: dict[str, Any] = {"sd_model_checkpoint": settings.default_model or self._first_sd_model()}

    def sd_models(self) -> list[Any]:
        """Stable Diffusion checkpoints the model sources list (txt2img and inpainting ones)."""
        return [m for m in self.registry.find_models() if m.family.startswith(SD_FAMILY_PREFIXES)]

    def refiners(self) -> list[str]:
        """The names of the listed SDXL refiners (A1111's ``refiner_checkpoint`` may name only these)."""
        return [m.name for m in self.registry.find_models() if m.family in REFINER_FAMILIES]

    def _first_sd_model(self) -> str | None:
        # A refiner only finishes another model's image: never the default checkpoint.
        models = [m for m in self.sd_models() if "inpaint" not in m.family and m.family not in REFINER_FAMILIES
                  and not m.family.endswith("-fill")]  # fmt: skip
        return models[0].name if models else None

    def make_job(
        self,
        task: str,
        inputs: Sequence[Any] | Mapping[str, Any] = (),
        params: Mapping[str, Any] | None = None,
        *,
        model: str | None = None,
        backend: str | None = None,
        dtype: str | None = None,
        seed: int | None = None,
        count: int = 1,
        preview_every: int = 0,
        model_families: Sequence[str] = (),
    ) -> Job:
        """Check a request once (names, paths, images, parameters) and turn it into a queued-ready job.

        ``inputs`` are the task's declared inputs, in order or by name; images as base64 text, bytes, or
        ``{"path": ...}`` inside an ``--allow-path`` folder. Raises a one-line ``DifftoolError``.
        """
        from difftool.app.api import new_seed, task_inputs
        from difftool.app.plan import preflight

        instance = self.registry.task(task)
        limit = self.settings.max_body_bytes
        inputs = task_inputs(instance, inputs)  # in order, as the API checks them
        if not 1 <= int(count) <= MAX_COUNT:
            raise ParameterError(f"count {count} is out of range", f"ask for 1 to {MAX_COUNT} outputs per request")
        loaded = [
            self.load_image(value, port.name) if port.kind in ("image", "mask") else value
            for port, value in zip(instance.inputs, inputs, strict=True)
        ]
        pixels = self.settings.max_pixels
        values = check_params(instance, dict(params or {}), self.registry, self.policy, limit, pixels)
        kinds = {p.name: p.type for p in instance.params}
        for name, value in values.items():
            if kinds.get(name) in ("image", "mask") and value is not None:
                values[name] = self.load_image(value, name)
        request: dict[str, Any] = {"device": self.settings.devices[0]}
        if model and model not in instance.model_keywords:  # a name of the task's families (a caller may narrow)
            families = model_families or instance.model_families or ()
            if families and not model_families:  # and those a family plugin runs the task for (SD3, Flux)
                families = (*families, *self.registry.delegated_families(task))
            request["model"] = resolve_model(model, self.registry, self.policy, families)
        elif model:
            request["model"] = model
        if backend:
            request["backend"] = backend
        if dtype:
            request["dtype"] = dtype
        resolver = PolicyResolver(self.registry, self.policy)  # models and files, by kind, through the policy
        plan = preflight(task, params=values, registry=self.registry, resolver=resolver, **request)
        self.check_work(plan, [image.size for image in loaded if isinstance(image, LoadedImage)], int(count))
        first = new_seed() if seed is None or int(seed) < 0 else int(seed)
        return Job(plan, loaded, [first + i for i in range(int(count))], preview_every=max(0, int(preview_every)))

    def load_image(self, value: Any, what: str) -> LoadedImage:
        """An image a request sent, within the body limit and the pixel budget (checked before decoding)."""
        return load_image(value, what, self.policy, self.settings.max_body_bytes, self.settings.max_pixels)

    def check_work(self, plan: Plan, sizes: Sequence[tuple[int, int]], count: int) -> None:
        """Refuse (413) a request whose outputs are over the pixel budget, before it is queued."""
        size = plan.task.output_size(plan.params, sizes)
        if size is None:
            return
        check_pixels(*size, what=f"the {plan.task_name} output", limit=self.settings.max_pixels, fix=PIXELS_FIX)
        total, budget = size[0] * size[1] * count, self.settings.max_work_pixels
        if total > budget:
            raise ImageTooLargeError(
                f"{count} outputs of {size[0]}x{size[1]} are {total:,} pixels, "
                f"over this server's {budget:,} per request",
                "ask for fewer or smaller images",
            )

    def submit(self, job: Job) -> Job:
        return self.queue.submit(job)
