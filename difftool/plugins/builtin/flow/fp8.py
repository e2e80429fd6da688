"""fp8 weights kept in fp8: each layer is cast to the run's precision only while it computes.

People store Flux and SD 3.5 as fp8 (``float8_e4m3fn`` / ``float8_e5m2``) safetensors to halve their
size. diffusers' layerwise-casting hook keeps a layer (linear, convolution) in its fp8 storage and upcasts
it while it computes; which layers is decided here by what the file stores (:func:`keep_in_fp8`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")


def storage_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The fp8 dtype most of a state dict's matrices are stored in, or ``None``."""
    counts: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.ndim >= 2:
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + 1
    if not counts:
        return None
    common = max(counts, key=lambda d: counts[d])
    return common if str(common).removeprefix("torch.") in FP8_DTYPES else None


def keep_in_fp8(module: Any, storage: torch.dtype, compute: torch.dtype) -> Any:
    """Layerwise casting on a diffusers model whose weights were loaded as stored: each linear or convolution
    layer stored in fp8 stays in fp8 and is cast to ``compute`` only while it runs (diffusers' hook); every
    other parameter (norms, embeddings, a layer the file keeps wider) is stored in ``compute`` now.

    By what the file stores, not by diffusers' name patterns: those upcast every layer under a ``norm`` name,
    which in Flux.1 are the AdaLN modulation linears (``norm1.linear``...), about 3.2 B parameters: 6.4 GB
    in bf16 for values the file holds in fp8 (upcast when they run, they compute the same either way)."""
    import torch
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

    wide = tuple(module._keep_in_fp32_modules or ())
    for name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if (
            isinstance(sub, _GO_LC_SUPPORTED_PYTORCH_LAYERS)
            and isinstance(weight, torch.nn.Parameter)
            and weight.dtype == storage
            and not any(re.search(p, name) for p in wide)
        ):
            apply_layerwise_casting_hook(sub, storage, compute, non_blocking=False)
            continue
        for tensor in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(compute)
    module._difftool_storage_dtype = storage
    return module
