"""What the ``tensorrt`` stand-in saw and what failures to inject: shared by its builder, engines and module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from difftool.testing.fake_cuda import FakeCuda


@dataclass
class FakeTensorRTState:
    """What the fake saw: builds, device current at each creation, refits, and failures to inject."""

    version: str
    cuda: FakeCuda
    builds: int = 0
    refits: int = 0
    executions: int = 0
    created_on: list[tuple[str, int]] = field(default_factory=list)
    build_flags: list[list[str]] = field(default_factory=list)
    #: Each build's optimization profiles (input name -> [min, opt, max]), in build order.
    build_profiles: list[list[dict[str, list[list[int]]]]] = field(default_factory=list)
    #: Each execution's bound input names and output names.
    executed: list[tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=list)
    #: Whether each build's network was strongly typed, in build order.
    build_typed: list[bool] = field(default_factory=list)
    #: What TensorRT logged as warnings (deprecated weak typing).
    warnings: list[str] = field(default_factory=list)
    #: Every ``set_tensor_address`` TensorRT refused: (name, address, why).
    refused_addresses: list[tuple[str, int, str]] = field(default_factory=list)
    #: Inject failures: ``deserialize``/``context`` return None, ``timing_cache`` rejects the cache,
    #: ``capture`` fails an enqueue inside a CUDA graph capture.
    fail: set[str] = field(default_factory=set)
    #: Called (and removed) while a build runs, after the builder read its timing cache: another
    #: process's build finishing meanwhile.
    during_build: list[Callable[[], None]] = field(default_factory=list)

    @property
    def release(self) -> tuple[int, int]:
        """(major, minor) of :attr:`version`."""
        major, minor = (int(part) for part in self.version.split(".")[:2])
        return major, minor
