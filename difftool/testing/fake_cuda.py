"""The CUDA runtime's stand-in: devices, capability, memory, the current device, streams and graphs, with "cuda"
tensors kept on the CPU (see :mod:`difftool.testing.gpu` for the harness that installs it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from difftool.core.cuda import CudaRuntime, device_index

GIB = 1 << 30


@dataclass
class FakeDevice:
    name: str = "Fake RTX 4090"
    capability: tuple[int, int] = (8, 9)
    total: int = 24 * GIB
    free: int = 20 * GIB


class FakeStream:
    """A stream handle. Work TensorRT enqueues on it (``execute_async_v3``) is held until the stream is
    synchronized or another stream waits for it, as a GPU runs it later: code that reads an engine's output
    without ordering the read after the stream reads an unwritten buffer here too.

    torch's own operations on these "cuda" tensors are CPU operations and run at once, so only TensorRT's
    side of the ordering is modelled (and a CUDA graph's replay runs at once: difftool reads its output on
    the same stream)."""

    def __init__(self, device: int, cuda: FakeCuda | None = None, handle: int | None = None) -> None:
        self.device, self.cuda = device, cuda
        self.cuda_stream = 0x1000 + device if handle is None else handle  # 0x1000 + n: a device's default

    def wait_stream(self, other: Any) -> None:
        if self.cuda is not None:
            self.cuda.flush(other.cuda_stream)

    def synchronize(self) -> None:
        if self.cuda is not None:
            self.cuda.flush(self.cuda_stream)


class FakeGraph:
    """A captured CUDA graph: the launches recorded during capture, replayed in order."""

    def __init__(self) -> None:
        self.launches: list[Any] = []

    def replay(self) -> None:
        for launch in self.launches:
            launch()


class FakeCuda(CudaRuntime):
    """CUDA as a GPU machine would answer it; "cuda" tensors live on the CPU."""

    fake = True

    def __init__(self, devices: list[FakeDevice] | None = None) -> None:
        self.devices = devices or [FakeDevice(), FakeDevice("Fake RTX A2000", (8, 6), 12 * GIB, 10 * GIB)]
        self.current_index = 0
        self.capturing: FakeGraph | None = None
        self.captures = 0
        #: Work enqueued on each stream (by handle) and not yet run: see :class:`FakeStream`.
        self.pending: dict[int, list[Any]] = {}
        self.streams = 0

    def enqueue(self, stream: int, work: Any) -> None:
        """Hold ``work`` until stream ``stream`` is synchronized or waited for (what a GPU queue does)."""
        self.pending.setdefault(stream, []).append(work)

    def flush(self, stream: int) -> None:
        """Run what stream ``stream`` holds, in order."""
        while self.pending.get(stream):
            self.pending[stream].pop(0)()

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return len(self.devices)

    def _device(self, device: str) -> FakeDevice:
        index = device_index(device)
        if index >= len(self.devices):
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        return self.devices[index]

    def capability(self, device: str) -> tuple[int, int]:
        return self._device(device).capability

    def name(self, device: str) -> str:
        return self._device(device).name

    def total_memory(self, device: str) -> int:
        return self._device(device).total

    def mem_get_info(self, device: str) -> tuple[int, int]:
        found = self._device(device)
        return found.free, found.total

    @contextlib.contextmanager
    def current(self, device: str) -> Iterator[None]:
        self._device(device)
        previous, self.current_index = self.current_index, device_index(device)
        try:
            yield
        finally:
            self.current_index = previous

    def placement(self, device: str) -> Any:
        import torch

        if device.startswith("cuda"):
            self._device(device)
            return torch.device("cpu")
        return torch.device(device)

    def new_stream(self, device: str) -> FakeStream:
        self.streams += 1
        return FakeStream(device_index(device), self, 0x2000 + self.streams)  # each its own queue

    def current_stream(self, device: str) -> FakeStream:
        return FakeStream(device_index(device), self)

    def use_stream(self, stream: Any) -> Any:
        return contextlib.nullcontext()

    def new_graph(self) -> FakeGraph:
        return FakeGraph()

    @contextlib.contextmanager
    def capture(self, graph: FakeGraph, stream: Any) -> Iterator[None]:
        self.capturing, self.captures = graph, self.captures + 1
        try:
            yield
        finally:
            self.capturing = None

    def empty_cache(self) -> None:
        pass
