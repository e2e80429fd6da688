"""Style from a reference image (IP-Adapter): the parameters ``generate`` and ``style`` declare, their
checks, and the hooks the tasks call. Light to import (no torch): listing tasks imports it; the work is in
:mod:`ip_adapter_run` (loading, encoding, attaching) and :mod:`ip_adapter_files` (finding the files).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from difftool.core.errors import ParameterError
from difftool.core.task import Param, RunContext, TaskRequest, TaskResult

MODES = ("all", "style", "composition")

#: The parameters ``generate`` and ``style`` declare for a reference image.
REFERENCE_PARAMS = (
    Param(
        "reference",
        "path",
        multiple=True,
        help="reference image(s) whose style the output takes (IP-Adapter); repeatable, or a folder "
        "(their embeddings are averaged)",
    ),
    Param(
        "ip_adapter",
        "path",  # a path, so a server checks it against --allow-path; a bare name is looked up in the roots
        default=None,
        help="IP-Adapter file, or its name in ipadapter/ or models/ipadapter under the model roots",
    ),
    Param(
        "image_encoder",
        "path",
        default=None,
        help="CLIP image encoder (folder or .safetensors); default: image_encoder/ beside the adapter or "
        "clip_vision/ under the model roots",
    ),
    Param("reference_weight", "float", default=0.6, min=0.0, max=2.0, help="how strongly the reference counts"),
    Param(
        "reference_mode",
        "choice",
        default="all",
        choices=MODES,
        help="all: plain IP-Adapter; style / composition: only the blocks carrying style or layout (InstantStyle)",
    ),
)


def check(params: Mapping[str, Any]) -> None:
    """An adapter needs a reference (refused before anything loads). A reference needs an adapter on Stable
    Diffusion (:func:`with_reference`; a family plugin's model may find its own: Flux Redux)."""
    if params["ip_adapter"] and not params["reference"]:
        raise ParameterError("--ip-adapter needs a reference image", "pass --reference IMAGE (or a folder)")


def check_backend(params: Mapping[str, Any], backend: Any) -> None:
    if params["reference"] and backend.name != "torch":
        raise ParameterError(
            f"--reference (IP-Adapter) runs on the torch backend only, not --backend {backend.name}",
            "pass --backend torch",
        )


def with_reference(run: Callable[..., TaskResult]) -> Callable[..., TaskResult]:
    """Decorate a Stable Diffusion task's ``run``: with a ``reference``, the model's U-Net carries the
    IP-Adapter (:func:`ip_adapter_run.attached`) for the whole run, hires and refiner passes and every tile
    included (a refiner, another U-Net, runs without it); the U-Net's own processors are back after it,
    also when the run fails. Another family's model (SD3, Flux) or a task's own model (inpaint's) is refused."""

    @functools.wraps(run)
    def wrapper(self: Any, request: TaskRequest, context: RunContext) -> TaskResult:
        params = request.params
        if not params["reference"]:
            return run(self, request, context)
        from difftool.plugins.builtin.sd.ip_adapter_run import attached
        from difftool.plugins.builtin.sd.models import delegated_family, is_sd_request, sd_model_for

        family = delegated_family(context, self.name)
        if family is not None and family.takes_reference:
            return run(self, request, context)  # the family reads the reference itself (Flux Redux)
        if family is not None or not is_sd_request(context.model, context):
            raise ParameterError(
                "--reference (IP-Adapter) runs on Stable Diffusion 1.x/2.x/XL models only",
                "pass an SD 1.x or SDXL --model, or drop --reference",
            )
        if not params["ip_adapter"]:
            raise ParameterError("--reference needs an IP-Adapter", "pass --ip-adapter FILE (or a name in ipadapter/)")
        model = sd_model_for(context, params)  # cached: the very model run() gets
        with attached(params, model, context):
            return run(self, request, context)

    return wrapper


def wrapped(model: Any, denoiser: Any, guided: bool) -> Any:
    """``denoiser`` with the image tokens of a reference attached to ``model``'s U-Net, or itself."""
    reference = getattr(model.unet, "_difftool_reference", None)
    if reference is None:
        return denoiser
    from difftool.plugins.builtin.sd.ip_adapter_run import ReferencedDenoiser

    return ReferencedDenoiser(denoiser, reference, guided)
