"""The CUDA hardware boundary: every question difftool asks of the GPU goes through :func:`runtime`.

:class:`CudaRuntime` is a thin layer over ``torch.cuda`` with no logic of its own. It exists so that
one object stands for "the GPU": the test harness (:mod:`difftool.testing.gpu`) installs a stand-in
that answers for a GPU and keeps "cuda" tensors on the CPU, and every line of difftool above it runs
unchanged. Code that places tensors asks :meth:`CudaRuntime.placement` rather than ``torch.device``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from difftool.core.runtime import Current


def device_index(device: str) -> int:
    """``cuda:1`` -> 1, ``cuda`` -> 0."""
    return int(device.partition(":")[2] or 0)


class CudaRuntime:
    """What difftool asks the CUDA driver (through PyTorch)."""

    fake = False

    def is_available(self) -> bool:
        import torch

        return torch.cuda.is_available()

    def device_count(self) -> int:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def capability(self, device: str) -> tuple[int, int]:
        import torch

        return tuple(torch.cuda.get_device_capability(device_index(device)))  # type: ignore[return-value]

    def name(self, device: str) -> str:
        import torch

        return str(torch.cuda.get_device_name(device_index(device)))

    def total_memory(self, device: str) -> int:
        import torch

        return int(torch.cuda.get_device_properties(device_index(device)).total_memory)

    def mem_get_info(self, device: str) -> tuple[int, int]:
        """(free, total) bytes on ``device``."""
        import torch

        free, total = torch.cuda.mem_get_info(device_index(device))
        return int(free), int(total)

    @contextlib.contextmanager
    def current(self, device: str) -> Iterator[None]:
        """Make ``device`` the current CUDA device (TensorRT builds and runs on the current one)."""
        import torch

        with torch.cuda.device(device_index(device)):
            yield

    def placement(self, device: str) -> Any:
        """The ``torch.device`` holding tensors for ``device``."""
        import torch

        return torch.device(device)

    def new_stream(self, device: str) -> Any:
        import torch

        return torch.cuda.Stream(device=device_index(device))

    def current_stream(self, device: str) -> Any:
        import torch

        return torch.cuda.current_stream(device_index(device))

    def use_stream(self, stream: Any) -> Any:
        import torch

        return torch.cuda.stream(stream)

    def new_graph(self) -> Any:
        import torch

        return torch.cuda.CUDAGraph()

    def capture(self, graph: Any, stream: Any) -> Any:
        import torch

        return torch.cuda.graph(graph, stream=stream)

    def empty_cache(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


_RUNTIME = Current(CudaRuntime())


def runtime() -> CudaRuntime:
    """The CUDA runtime in use (the real one unless a test harness installed a stand-in)."""
    return _RUNTIME.get()


def installed(replacement: CudaRuntime) -> contextlib.AbstractContextManager[CudaRuntime]:
    """Use ``replacement`` as the CUDA runtime inside a ``with`` block (the test harness's seam)."""
    return _RUNTIME.using(replacement)


def install(replacement: CudaRuntime) -> None:
    """Use ``replacement`` for the rest of the process (a Ray worker's harness plugin)."""
    _RUNTIME.set(replacement)
