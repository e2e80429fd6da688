"""A ``tensorrt`` module for CPU-only machines: TensorRT 10's or 11's Python API over ONNX Runtime.

Its engines run the real ONNX export on the CPU and check what TensorRT checks: the network and
precision flags the version has, every input bound with a shape inside the selected optimization
profile, a pointer for every tensor, and a refit with the same graph structure. Bound memory is read
and written by pointer, as TensorRT does. Used through :func:`difftool.testing.gpu.gpu_harness`.
"""

from __future__ import annotations

import ctypes
import json
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from difftool.testing.gpu import FakeCuda

_MAGIC = b"FAKETRT1"
_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
_CTYPES = {"float32": ctypes.c_float, "float16": ctypes.c_uint16, "int64": ctypes.c_int64}


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
    #: Inject failures: ``deserialize``/``context`` return None, ``timing_cache`` rejects the cache,
    #: ``capture`` fails an enqueue inside a CUDA graph capture.
    fail: set[str] = field(default_factory=set)


class _Errors:
    """TensorRT parsers' error list: ``num_errors`` and ``get_error(i)``."""

    errors: list[str]

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> str:
        return self.errors[index]


def _structure(model: Any) -> str:
    """The graph without initializer values (what a refit must keep)."""
    import hashlib

    digest = hashlib.sha256()
    for node in model.graph.node:
        digest.update(f"{node.op_type}|{list(node.input)}|{list(node.output)}".encode())
    for init in model.graph.initializer:
        digest.update(f"{init.name}|{list(init.dims)}|{init.data_type}".encode())
    return digest.hexdigest()


def fake_tensorrt(state: FakeTensorRTState) -> types.ModuleType:
    """A ``tensorrt`` module imitating version ``state.version`` (10.x: precision flags; 11.x: strongly typed)."""
    major = int(state.version.split(".")[0])
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

    flag_names = ["REFIT", "STRIP_PLAN", "TF32", "DEBUG"] + (["FP16", "BF16", "INT8", "FP8"] if major < 11 else [])
    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.BuilderFlag = types.SimpleNamespace(**{n: n for n in flag_names})  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    trt.IProgressMonitor = IProgressMonitor  # type: ignore[attr-defined]

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.onnx: bytes | None = None

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return self.data or b"fake-timing-cache"

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

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if "timing_cache" in state.fail and cache.data:
                return False
            self.timing = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            return self.timing or TimingCache(b"")

        def add_optimization_profile(self, profile: Any) -> int:
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
            if network.onnx is None or not config.profiles:
                return None
            if network.flags & (1 << 5) and {"FP16", "BF16"} & set(config.flags):
                return None  # strongly typed networks take no precision flags
            if "WORKSPACE" not in config.pools:
                return None
            state.builds += 1
            state.build_flags.append(list(config.flags))
            state.build_profiles.append([dict(p) for p in config.profiles])
            header = {
                "profiles": config.profiles,
                "refittable": "REFIT" in config.flags,
                "device": cuda.current_index,
                "capability": list(cuda.capability(f"cuda:{cuda.current_index}")),
            }
            if config.progress_monitor is not None:
                config.progress_monitor.phase_start("Building engine", None, 1)
                config.progress_monitor.step_complete("Building engine", 0)
                config.progress_monitor.phase_finish("Building engine")
            raw = json.dumps(header).encode()
            return _MAGIC + len(raw).to_bytes(8, "little") + raw + network.onnx

    class OnnxParser(_Errors):
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network
            self.errors: list[str] = []

        def parse_from_file(self, path: str) -> bool:
            import onnx

            try:
                model = onnx.load(path)
                onnx.checker.check_model(model)
            except Exception as error:  # noqa: BLE001 - reported like TensorRT's parser errors
                self.errors.append(str(error))
                return False
            self.network.onnx = model.SerializeToString()
            return True

    class Engine:
        def __init__(self, header: dict[str, Any], onnx_bytes: bytes) -> None:
            self.header = header
            self.onnx = onnx_bytes
            self._session: Any = None

        def session(self) -> Any:
            if self._session is None:
                import onnxruntime as ort

                self._session = ort.InferenceSession(self.onnx, providers=["CPUExecutionProvider"])
            return self._session

        def create_execution_context(self) -> Context | None:
            state.created_on.append(("context", cuda.current_index))
            if "context" in state.fail:
                return None
            return Context(self)

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.profile: int | None = None
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_optimization_profile_async(self, index: int, stream: int) -> bool:
            if not 0 <= index < len(self.engine.header["profiles"]):
                return False
            self.profile = index
            return True

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            profiles = self.engine.header["profiles"]
            bounds = profiles[self.profile or 0].get(name)
            if bounds is None:
                raise RuntimeError(f"TensorRT: {name!r} is not an input of the engine")
            low, _, high = bounds
            if len(shape) != len(low) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high, strict=True)):
                return False  # TensorRT logs "... is out of the range of the optimization profile" and refuses
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name: str, address: int) -> bool:
            self.addresses[name] = int(address)
            return True

        def execute_async_v3(self, stream: int) -> bool:
            if cuda.capturing is not None:
                if "capture" in state.fail:
                    return False  # an enqueue TensorRT cannot capture
                snapshot = (dict(self.shapes), dict(self.addresses))
                cuda.capturing.launches.append(lambda: self._run(*snapshot))
                return True
            return self._run(self.shapes, self.addresses)

        def _run(self, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int]) -> bool:
            import numpy as np

            session = self.engine.session()
            feeds = {}
            for spec in session.get_inputs():
                if spec.name not in shapes or spec.name not in addresses:
                    return False  # an unbound input: TensorRT refuses to enqueue
                dtype = _NUMPY[spec.type]
                count = int(np.prod(shapes[spec.name]))
                buffer = (_CTYPES[dtype] * count).from_address(addresses[spec.name])
                feeds[spec.name] = np.frombuffer(buffer, dtype=dtype).reshape(shapes[spec.name]).copy()
            outputs = session.get_outputs()
            if any(output.name not in addresses for output in outputs):
                return False  # an unbound output: TensorRT refuses to enqueue
            for output, value in zip(outputs, session.run(None, feeds), strict=True):
                result = np.ascontiguousarray(value.astype(_NUMPY[output.type]))
                target = (_CTYPES[result.dtype.name] * result.size).from_address(addresses[output.name])
                np.frombuffer(target, dtype=result.dtype)[:] = result.reshape(-1)
            state.executions += 1
            state.executed.append((tuple(feeds), tuple(output.name for output in outputs)))
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
            return Engine(header, data[16 + size :])

    class Refitter:
        def __init__(self, engine: Engine, logger: Logger) -> None:
            if not engine.header["refittable"]:
                raise RuntimeError("TensorRT: the engine was not built refittable")
            self.engine = engine
            self.pending: bytes | None = None

        def refit_cuda_engine(self) -> bool:
            if self.pending is None:
                return False
            self.engine.onnx, self.engine._session = self.pending, None
            state.refits += 1
            return True

    class OnnxParserRefitter(_Errors):
        def __init__(self, refitter: Refitter, logger: Logger) -> None:
            self.refitter = refitter
            self.errors: list[str] = []

        def refit_from_file(self, path: str) -> bool:
            import onnx

            new = onnx.load(path)
            if _structure(new) != _structure(onnx.load_from_string(self.refitter.engine.onnx)):
                self.errors.append("the ONNX graph's structure differs from the engine's")
                return False
            self.refitter.pending = new.SerializeToString()
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
