"""Refit a TensorRT engine by name from a module's state dict, as NVIDIA's Stable Diffusion demo does.

A new LoRA combination changes a U-Net's weights, not its graph: rather than export and validate the whole
U-Net again (3.4 GB for SD 1.5, ~10 GB for SDXL, per combination), the engine of an earlier export of the
same checkpoint takes the new weights straight from PyTorch (``IRefitter.set_named_weights``), using that
export's :mod:`~difftool.exporters.refit_map`. Each weight is cast to the dtype of the engine's prototype
(an fp16 export keeps some layers in fp32), and the refit is refused if TensorRT still misses a weight.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from difftool.core.errors import BackendUnavailableError
from difftool.exporters.cache import ArtifactCache, Entry
from difftool.exporters.refit_map import REFIT_MAP_FILE, named_weights

if TYPE_CHECKING:
    import torch

log = logging.getLogger("difftool")

#: TensorRT DataType names -> torch dtype names (the weights a refit may set).
_TORCH = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}
#: Components an export of the same graph may differ in: the weights it holds.
_WEIGHTS = ("weights", "lora_of")


def refit_source(
    module: Any, components: Mapping[str, Any], base: str, cache: ArtifactCache | None = None
) -> tuple[Entry, dict[str, torch.Tensor]] | None:
    """An export of the checkpoint ``base`` (its own, or an earlier LoRA combination's) with the graph
    ``components`` describe and a complete refit map, and ``module``'s weights by that export's names;
    ``None`` when there is none (the caller exports, as on first use)."""
    cache = cache or ArtifactCache()
    precision = components["precision"]
    identity = {k: v for k, v in json.loads(json.dumps(dict(components), default=str)).items() if k not in _WEIGHTS}
    for name in (f"unet-{base[:12]}-{precision}", f"unet-{base[:12]}-lora-{precision}"):
        for entry in cache.find("onnx", name):
            theirs = entry.manifest.get("components", {})
            if theirs.get("weights") != base and theirs.get("lora_of") != base:
                continue  # another checkpoint sharing the name's 12 characters
            if any(theirs.get(k) != v for k, v in identity.items()) or REFIT_MAP_FILE not in entry.files:
                continue  # another torch / onnx / format, or an export made before refit maps
            weights = named_weights(module, json.loads(entry.file(REFIT_MAP_FILE).read_text()))
            if weights is not None:
                return entry, weights
    return None


def refit_by_name(engine: Any, weights: Mapping[str, torch.Tensor], source: Entry, label: str) -> None:
    """Set ``weights`` (initializer name -> tensor) in the deserialized ``engine`` and refit it in memory.

    A weight TensorRT also wants (``get_missing_weights``: one it combined with a weight set here) that
    the module does not hold, e.g. a folded constant, is taken from ``source``, the export mapped."""
    import tensorrt as trt

    refitter = trt.Refitter(engine, trt.Logger(trt.Logger.WARNING))
    kept: list[Any] = []  # TensorRT reads the host memory at refit_cuda_engine(): keep them alive until then
    _set(trt, refitter, weights, kept, label)
    missing = [name for name in refitter.get_missing_weights() if name not in weights]
    if missing:
        from difftool.exporters.refit_map import initializers

        _set(trt, refitter, initializers(source.file("model.onnx"), set(missing)), kept, label)
    missing = list(refitter.get_missing_weights())
    if missing or not refitter.refit_cuda_engine():
        raise BackendUnavailableError(
            f"TensorRT could not refit engine {label} by name"
            + (f": {len(missing)} weights missing, e.g. {missing[0]}" if missing else ""),
            "clear the engine (difftool cache clear) to rebuild it",
        )
    del kept


def _set(trt: Any, refitter: Any, weights: Mapping[str, torch.Tensor], kept: list[Any], label: str) -> None:
    import torch

    for name, value in weights.items():
        prototype = refitter.get_weights_prototype(name)
        dtype = _TORCH.get(str(getattr(prototype.dtype, "name", prototype.dtype)))
        if prototype.count < 0 or dtype is None:
            continue  # not refittable in this engine (TensorRT folded or never kept it)
        tensor = value.detach().to("cpu", getattr(torch, dtype)).contiguous()
        if tensor.numel() != prototype.count:
            raise BackendUnavailableError(
                f"TensorRT engine {label}: weight {name} has {prototype.count} values, the model {tensor.numel()}",
                "clear the engine (difftool cache clear) to rebuild it",
            )
        kept.append(tensor)
        if not refitter.set_named_weights(name, trt.Weights(prototype.dtype, tensor.data_ptr(), tensor.numel())):
            raise BackendUnavailableError(
                f"TensorRT refused weight {name} for engine {label}", "clear the engine (difftool cache clear)"
            )
