"""fp8 weights kept in fp8: each layer is cast to the run's precision only while it computes.

People store Flux and SD 3.5 as fp8 (``float8_e4m3fn`` / ``float8_e5m2``) safetensors to halve their
size. diffusers' layerwise casting keeps the big layers (linear, convolution) in their fp8 storage and
upcasts one layer at a time in a hook; the layers it skips (norms, positional embeddings, the output
projection) and any other parameter are stored in the compute precision here, before it is enabled.
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
    """Enable layerwise casting on a diffusers model whose weights were loaded as stored (fp8)."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    patterns = (
        *DEFAULT_SKIP_MODULES_PATTERN,
        *(module._keep_in_fp32_modules or ()),
        *(module._skip_layerwise_casting_patterns or ()),
    )
    for name, sub in module.named_modules():
        hooked = isinstance(sub, _GO_LC_SUPPORTED_PYTORCH_LAYERS) and not any(re.search(p, name) for p in patterns)
        if hooked:
            continue
        for tensor in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(compute)
    module.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
    module._difftool_storage_dtype = storage
    return module
