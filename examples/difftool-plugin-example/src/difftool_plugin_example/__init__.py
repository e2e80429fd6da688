"""An example difftool plugin: a ``posterize`` task, a ``ddim-trailing`` scheduler and a model family
(PixArt-Sigma, for ``generate``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from difftool.core.images import LoadedImage, to_pil
from difftool.core.scheduler import DiffusersSchedulerFactory
from difftool.core.task import Param, RunContext, Task, TaskRequest, TaskResult
from difftool.plugins import hookimpl


class Posterize(Task):
    """Reduce each channel to a few levels, one channel per progress step."""

    name = "posterize"
    summary = "Reduce an image to a few colour levels per channel"
    params = (
        Param("levels", "int", default=4, min=2, max=64, help="levels per channel"),
        Param("keep_mode", "bool", default=False, help="write grayscale input as grayscale"),
    )

    def run(self, request: TaskRequest, context: RunContext) -> TaskResult:
        image: LoadedImage = request.inputs["image"]
        levels = request.params["levels"]
        out = np.empty_like(image.rgb)
        for channel in range(3):
            context.cancel.raise_if_cancelled()
            out[..., channel] = np.round(image.rgb[..., channel] * (levels - 1)) / (levels - 1)
            context.report(channel + 1, 3)
        result = to_pil(out, image.alpha, grayscale=request.params["keep_mode"] and image.grayscale)
        return TaskResult([result], {"size": f"{result.width}x{result.height}"})


@hookimpl
def register_tasks(register: Callable[[type[Task]], None]) -> None:
    register(Posterize)


@hookimpl
def register_schedulers(register: Callable[..., None]) -> None:
    # DDIM with "trailing" timestep spacing: starts at the last training timestep, better in few steps.
    register(
        "ddim-trailing",
        DiffusersSchedulerFactory("DDIMScheduler", {"timestep_spacing": "trailing"}),
        label="DDIM trailing",
        summary="DDIM with trailing timestep spacing (example plugin)",
    )


@hookimpl
def register_families(register: Callable[..., None]) -> None:
    # A model family: `generate --model` with a PixArt-Sigma folder runs through difftool's core sampler.
    from difftool_plugin_example.pixart import PixArtSigma

    register(PixArtSigma())
