"""A ``tensorrt`` module for CPU-only machines: TensorRT 10's or 11's Python API over ONNX Runtime.

Its engines run the real ONNX export on the CPU and refuse what TensorRT refuses, so difftool's GPU
code is proven against TensorRT's contract, not its own assumptions:

- typing: a strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, the only kind on
  TensorRT 11) takes no precision flags and computes in the graph's own types; a weakly typed build
  with ``FP16`` and no precision constraints may run any layer in fp16, so the stand-in rounds every
  float tensor (weights and each layer's output) to fp16: the fp32 layers of an fp16 export are not
  kept (from 10.12 the build also logs that weak typing is deprecated);
- builder: the network and precision flags the version has; ``add_optimization_profile`` returns -1
  for an invalid profile (ranks differ, not min <= opt <= max); a build fails (``None``) when a
  profile names no network input or misses a dynamic input; inputs no layer reads are dropped from
  the engine (TensorRT warns "Unused Input" and the engine has no such tensor);
- weights: ``REFIT`` engines take other weights of the same graph structure; ``REFIT_IDENTICAL``
  engines only their build weights (TensorRT calls anything else undefined: refused here);
  ``STRIP_PLAN`` leaves the refittable (float) weights out of the plan, so a stripped engine computes
  with zeros until it is refitted; on TensorRT 11.3+ a ``REFIT`` engine drops GEMM biases, the known
  issue NVIDIA documents (``REFIT_IDENTICAL`` does not have it);
- engine: its I/O tensors (``num_io_tensors``, ``get_tensor_name/mode/dtype/shape``);
- context: ``set_input_shape`` inside the selected profile, ``set_tensor_address`` returning ``False``
  for an unknown name, a null or a not 256-byte aligned address; ``get_tensor_shape`` of an output
  once the inputs' shapes are set; every I/O tensor bound before ``execute_async_v3``;
- timing caches: entries per build, ``combine``, serialized with the version they came from.

Bound memory is read and written by pointer, as TensorRT does. Used through
:func:`difftool.testing.gpu.gpu_harness`.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from difftool.testing.fake_tensorrt_engine import (
    _DTYPES,
    Engine,
    _dims,
    _engine_model,
    _graph_inputs,
    _structure,
    _weights,
)

if TYPE_CHECKING:
    from difftool.testing.gpu import FakeCuda

_MAGIC = b"FAKETRT1"
_TIMING_MAGIC = b"FAKETC1:"


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


class _Errors:
    """TensorRT parsers' error list: ``num_errors`` and ``get_error(i)``."""

    errors: list[str]

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> str:
        return self.errors[index]


def fake_tensorrt(state: FakeTensorRTState) -> types.ModuleType:
    """A ``tensorrt`` module imitating version ``state.version`` (10.x: precision flags; 11.x: strongly typed)."""
    major, minor = (int(part) for part in state.version.split(".")[:2])
    import importlib.machinery

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = state.version  # type: ignore[attr-defined]
    trt.__dict__["_fake_state"] = state
    cuda = state.cuda

    class Logger:
        WARNING, ERROR, INFO = 2, 1, 3

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    flag_names = ["REFIT", "REFIT_IDENTICAL", "STRIP_PLAN", "TF32", "DEBUG"]
    flag_names += ["FP16", "BF16", "INT8", "FP8"] if major < 11 else []
    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.BuilderFlag = types.SimpleNamespace(**{n: n for n in flag_names})  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
    trt.TensorIOMode = types.SimpleNamespace(NONE="NONE", INPUT="INPUT", OUTPUT="OUTPUT")  # type: ignore[attr-defined]
    trt.DataType = types.SimpleNamespace(**{n: n for n in _DTYPES.values()})  # type: ignore[attr-defined]

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    trt.IProgressMonitor = IProgressMonitor  # type: ignore[attr-defined]

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.model: Any = None

    class TimingCache:
        """Tactic timings: one entry per (layer kind, profile) a build timed, tagged with the version."""

        def __init__(self, entries: set[str] | None = None) -> None:
            self.entries = set(entries or ())

        def serialize(self) -> bytes:
            body = {"version": state.version, "entries": sorted(self.entries)}
            return _TIMING_MAGIC + json.dumps(body).encode()

        def combine(self, other: TimingCache, ignore_mismatch: bool) -> bool:
            self.entries |= other.entries
            return True

        def reset(self) -> bool:
            self.entries.clear()
            return True

    def parse_timing(data: bytes) -> TimingCache | None:
        if not data:
            return TimingCache()
        if not data.startswith(_TIMING_MAGIC):
            return None  # not a timing cache at all
        body = json.loads(data[len(_TIMING_MAGIC) :])
        if body["version"] != state.version:
            return None  # TensorRT reads only its own version's caches
        return TimingCache(set(body["entries"]))

    class Config:
        def __init__(self) -> None:
            self.flags: list[str] = []
            self.pools: dict[str, int] = {}
            self.timing: TimingCache | None = None
            self.profiles: list[dict[str, Any]] = []
            self.progress_monitor: Any = None

        def set_flag(self, flag: str) -> None:
            self.flags.append(flag)

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            self.pools[pool] = size

        def create_timing_cache(self, data: bytes) -> TimingCache | None:
            return parse_timing(bytes(data))

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if "timing_cache" in state.fail and cache.entries:
                return False
            self.timing = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            return self.timing or TimingCache()

        def add_optimization_profile(self, profile: Any) -> int:
            for low, opt, high in profile.shapes.values():
                if not len(low) == len(opt) == len(high) or any(
                    not 0 <= a <= b <= c for a, b, c in zip(low, opt, high, strict=True)
                ):
                    return -1  # IOptimizationProfile::isValid() is false: TensorRT refuses it
            self.profiles.append(dict(profile.shapes))
            return len(self.profiles) - 1

    class OptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, list[list[int]]] = {}

        def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
            self.shapes[name] = [list(low), list(opt), list(high)]

    class Builder:
        def __init__(self, logger: Logger) -> None:
            state.created_on.append(("builder", cuda.current_index))

        def create_network(self, flags: int = 0) -> Network:
            if major >= 11 and not flags & (1 << 5):
                raise RuntimeError("TensorRT 11 builds strongly typed networks only")
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> OptimizationProfile:
            return OptimizationProfile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            if network.model is None or not config.profiles:
                return None
            typed = bool(network.flags & (1 << 5))
            if typed and {"FP16", "BF16"} & set(config.flags):
                return None  # strongly typed networks take no precision flags
            if not typed and {"FP16", "BF16"} & set(config.flags) and (major, minor) >= (10, 12):
                state.warnings.append("weakly typed networks (BuilderFlag.FP16/BF16) are deprecated")
            if "WORKSPACE" not in config.pools:
                return None
            inputs = {value.name: _dims(value) for value in _graph_inputs(network.model)}
            for profile in config.profiles:
                if set(profile) - set(inputs):
                    return None  # a profile for a tensor that is not a network input
                if any(-1 in dims and name not in profile for name, dims in inputs.items()):
                    return None  # "Optimization profile is missing values for" a dynamic input
            while state.during_build:
                state.during_build.pop(0)()
            state.builds += 1
            state.build_flags.append(list(config.flags))
            state.build_typed.append(typed)
            state.build_profiles.append([dict(p) for p in config.profiles])
            refit = (
                "REFIT" if "REFIT" in config.flags else "REFIT_IDENTICAL" if "REFIT_IDENTICAL" in config.flags else None
            )
            header = {
                "profiles": config.profiles,
                "refit": refit,
                "stripped": refit is not None and "STRIP_PLAN" in config.flags,
                "drops_gemm_bias": refit == "REFIT" and (major, minor) >= (11, 3),
                # no precision constraints: TensorRT may pick fp16 for any layer (the stand-in does)
                "weak_fp16": not typed and "FP16" in config.flags,
                "weights": _weights(network.model),
                "device": cuda.current_index,
                "capability": list(cuda.capability(f"cuda:{cuda.current_index}")),
            }
            timed = {f"{node.op_type}|{json.dumps(config.profiles)}" for node in network.model.graph.node}
            config.get_timing_cache().entries |= timed
            if config.progress_monitor is not None:
                config.progress_monitor.phase_start("Building engine", None, 1)
                config.progress_monitor.step_complete("Building engine", 0)
                config.progress_monitor.phase_finish("Building engine")
            model = _engine_model(network.model, strip=header["stripped"], drop_gemm_bias=header["drops_gemm_bias"])
            raw = json.dumps(header).encode()
            return _MAGIC + len(raw).to_bytes(8, "little") + raw + model.SerializeToString()

    class OnnxParser(_Errors):
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network
            self.errors: list[str] = []

        def parse_from_file(self, path: str) -> bool:
            import onnx

            try:
                onnx.checker.check_model(path)  # by path: a model with > 2 GB of external data checks too
                model = onnx.load(path)
            except Exception as error:  # noqa: BLE001 - reported like TensorRT's parser errors
                self.errors.append(str(error))
                return False
            self.network.model = model
            return True

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            state.created_on.append(("runtime", cuda.current_index))

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            if "deserialize" in state.fail or not data.startswith(_MAGIC):
                return None
            size = int.from_bytes(data[8:16], "little")
            header = json.loads(data[16 : 16 + size])
            if tuple(header["capability"]) != cuda.capability(f"cuda:{cuda.current_index}"):
                return None  # an engine from another GPU architecture
            return Engine(state, header, data[16 + size :])

    class Refitter:
        def __init__(self, engine: Engine, logger: Logger) -> None:
            if engine.header["refit"] is None:
                raise RuntimeError("TensorRT: the engine was not built refittable")
            self.engine = engine
            self.pending: Any = None

        def refit_cuda_engine(self) -> bool:
            if self.pending is None:
                return False
            header = self.engine.header
            self.engine.model = _engine_model(self.pending, strip=False, drop_gemm_bias=header["drops_gemm_bias"])
            self.engine._session, self.engine.refitted = None, True
            state.refits += 1
            return True

    class OnnxParserRefitter(_Errors):
        def __init__(self, refitter: Refitter, logger: Logger) -> None:
            self.refitter = refitter
            self.errors: list[str] = []

        def refit_from_file(self, path: str) -> bool:
            import onnx

            new = onnx.load(path)
            engine = self.refitter.engine
            if _structure(_engine_model(new, strip=False, drop_gemm_bias=False)) != _structure(engine.model):
                self.errors.append("the ONNX graph's structure differs from the engine's")
                return False
            if engine.header["refit"] == "REFIT_IDENTICAL" and _weights(new) != engine.header["weights"]:
                # TensorRT calls this undefined behaviour; the stand-in refuses it so nothing depends on it
                self.errors.append("REFIT_IDENTICAL engine: the weights differ from the build's")
                return False
            self.refitter.pending = new
            return True

    for name, value in {
        "Builder": Builder,
        "OnnxParser": OnnxParser,
        "Runtime": Runtime,
        "Refitter": Refitter,
        "OnnxParserRefitter": OnnxParserRefitter,
    }.items():
        setattr(trt, name, value)
    return trt
