"""Device and precision choices."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from difftool.core.errors import ParameterError

DTYPES: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AVX-512 BF16 or AMX), where bf16 is fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` -> fp16 on CUDA, bf16 on CPUs with native bf16, else fp32; others pass through."""
    if dtype not in DTYPES:
        raise ParameterError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is PyTorch (CUDA or CPU allocator) or Python running out of memory."""
    import torch

    text = str(error).lower()
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
    )


def release_memory() -> None:
    """Free what an out-of-memory failure left allocated, before a retry."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
