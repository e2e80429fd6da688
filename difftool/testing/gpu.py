"""Stand-ins for exactly two pieces of hardware, so the GPU paths run end to end on a CPU-only machine.

:class:`FakeCuda` answers for CUDA (devices, capability, memory, current device, streams, graphs) and
keeps "cuda" tensors on the CPU; :func:`~difftool.testing.fake_tensorrt.fake_tensorrt` is a
``tensorrt`` module whose engines run the real ONNX export in ONNX Runtime. Nothing of difftool is
replaced::

    with gpu_harness() as harness:          # tensorrt in sys.modules, the CUDA runtime swapped
        difftool.run("superres", "in.png", backend="tensorrt", device="cuda")
        assert harness.trt.builds == 1

A Ray worker gets the same harness by importing this module as a plugin (``plugin_modules``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from difftool.testing.fake_cuda import GIB, FakeCuda, FakeDevice, FakeGraph, FakeStream  # noqa: F401 - the harness's names
from difftool.testing.fake_tensorrt import FakeTensorRTState, fake_tensorrt


@dataclass
class GpuHarness:
    cuda: FakeCuda
    trt: FakeTensorRTState


@contextlib.contextmanager
def gpu_harness(version: str = "10.16.0", cuda: FakeCuda | None = None) -> Iterator[GpuHarness]:
    """Install the stand-ins (the CUDA runtime and ``tensorrt``) for the block; restore them after."""
    from difftool.core import cuda as cuda_module

    harness = GpuHarness(cuda or FakeCuda(), FakeTensorRTState(version, cuda or FakeCuda()))
    harness.trt.cuda = harness.cuda
    previous = sys.modules.get("tensorrt")
    sys.modules["tensorrt"] = fake_tensorrt(harness.trt)
    try:
        with cuda_module.installed(harness.cuda):
            yield harness
    finally:
        if previous is None:
            sys.modules.pop("tensorrt", None)
        else:
            sys.modules["tensorrt"] = previous
        from difftool.runtimes.tensorrt.controlnet import recent_controlnets
        from difftool.runtimes.tensorrt.denoiser import recent_engines

        recent_engines().clear()
        recent_controlnets().clear()


def install_for_process(version: str = "10.16.0") -> GpuHarness:
    """Install the stand-ins for the rest of this process (a Ray worker's plugin import)."""
    from difftool.core import cuda as cuda_module

    fake = FakeCuda()
    harness = GpuHarness(fake, FakeTensorRTState(version, fake))
    sys.modules["tensorrt"] = fake_tensorrt(harness.trt)
    cuda_module.install(fake)
    return harness
