"""Which PyTorch parameter each float initializer of an ONNX export holds: the map a refit by name needs.

A LoRA or fine-tune of an exported U-Net changes its weights, not its graph. With this map a refittable
TensorRT engine takes the new weights straight from the module's state dict
(``IRefitter.set_named_weights``), with no new export and no validation run, as NVIDIA's
Stable Diffusion demo does. The map is made once, when the export is built, by matching values: each
initializer is found among the parameters as it is, or transposed (a Linear exported as a MatMul).
ONNX and torch name things differently, and the exporter may fold or transpose, so names alone would
not do. Neither diffusers nor onnx offers this, hence written here.

A map is ``complete`` when every parameter was found: only then can no weight hide in a folded constant,
and only then does a refit by name replace the export (see :mod:`difftool.runtimes.tensorrt.refit`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REFIT_MAP_FILE = "refit-map.json"
#: ONNX element types a refit updates (the exports are fp32 or fp16), as torch dtype names.
_TORCH = {1: "float32", 10: "float16"}
_FLOAT_TYPES = set(_TORCH)


def _digest(tensor: torch.Tensor) -> str:
    import torch

    return hashlib.blake2b(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


def _float_initializers(path: Path, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``path``'s float initializers (external data included; only ``names`` if given), one at a time:
    an SDXL export holds 10 GB of them beside the module."""
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)  # tensor by tensor below: exports pass 2 GB
    for init in model.graph.initializer:
        if init.data_type in _FLOAT_TYPES and (names is None or init.name in names):  # not shape constants
            yield init.name, torch.from_numpy(numpy_helper.to_array(init, base_dir=str(path.parent)).copy())


def initializers(path: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The float initializers ``names`` of the export ``path``."""
    return dict(_float_initializers(path, names))


def weight_map(module: torch.nn.Module, onnx_path: Path) -> dict[str, Any]:
    """``{"weights": {initializer: {"names": [...], "transposed": bool}}, "complete": bool, "unmapped": [...]}``.

    ``names`` lists every parameter holding the initializer's value (equal values, e.g. two LayerNorms
    still at their initial ones, all match; a refit checks they still agree)."""
    import onnx
    import torch

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    wanted = {(_TORCH[i.data_type], math.prod(i.dims)) for i in graph.initializer if i.data_type in _FLOAT_TYPES}
    # keyed by the flat values: the exporter reshapes some parameters (a GroupNorm's scale to C x 1 x 1)
    index: dict[tuple[str, int, str], list[tuple[str, bool]]] = {}
    state = {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        for dtype in {d for d, n in wanted if n == tensor.numel()}:
            cast = tensor.to(getattr(torch, dtype))
            for view, transposed in [(cast, False)] + ([(cast.t(), True)] if cast.dim() == 2 else []):
                index.setdefault((dtype, view.numel(), _digest(view)), []).append((name, transposed))
    weights: dict[str, Any] = {}
    for init_name, value in _float_initializers(onnx_path):
        found = index.get((str(value.dtype).removeprefix("torch."), value.numel(), _digest(value)), [])
        if found:
            transposed = found[0][1]
            weights[init_name] = {"names": [n for n, t in found if t == transposed], "transposed": transposed}
    mapped = {name for entry in weights.values() for name in entry["names"]}
    unmapped = sorted(n for n, t in state.items() if t.is_floating_point() and n not in mapped)
    return {"weights": weights, "complete": not unmapped, "unmapped": unmapped}


def write_weight_map(module: torch.nn.Module, onnx_path: Path) -> None:
    """Save :func:`weight_map` beside the export (inside the cache entry being built)."""
    (onnx_path.parent / REFIT_MAP_FILE).write_text(json.dumps(weight_map(module, onnx_path), sort_keys=True))


def named_weights(module: torch.nn.Module, refit_map: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The module's value for each mapped initializer (transposed where the export transposed it), or
    ``None`` where the map cannot serve this module (incomplete, a parameter missing, or two parameters
    that shared one initializer now differ)."""
    import torch

    if not refit_map.get("complete"):
        return None
    state = module.state_dict()
    out = {}
    for init_name, entry in refit_map["weights"].items():
        names = entry["names"]
        if any(name not in state for name in names):
            return None
        value = state[names[0]].detach()
        if any(not torch.equal(state[name].detach(), value) for name in names[1:]):
            return None  # the export holds one tensor where the module now has two
        out[init_name] = value.t() if entry["transposed"] else value
    return out
