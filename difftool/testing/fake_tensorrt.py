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

import ctypes
import json
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from difftool.testing.gpu import FakeCuda

_MAGIC = b"FAKETRT1"
_TIMING_MAGIC = b"FAKETC1:"
_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
_CTYPES = {"float32": ctypes.c_float, "float16": ctypes.c_uint16, "int64": ctypes.c_int64}
#: ONNX element types -> TensorRT's DataType names.
_DTYPES = {1: "FLOAT", 10: "HALF", 7: "INT64", 6: "INT32", 16: "BF16"}
_FLOAT_TYPES = {1, 10, 16}  # the initializers a refit updates (and STRIP_PLAN leaves out)
#: TensorRT's ``setTensorAddress`` alignment.
ALIGNMENT = 256


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


def _structure(model: Any) -> str:
    """The graph without initializer values (what a refit must keep)."""
    import hashlib

    digest = hashlib.sha256()
    for node in model.graph.node:
        digest.update(f"{node.op_type}|{list(node.input)}|{list(node.output)}".encode())
    for init in model.graph.initializer:
        digest.update(f"{init.name}|{list(init.dims)}|{init.data_type}".encode())
    return digest.hexdigest()


def _weights(model: Any) -> str:
    """A digest of the refittable weights' values."""
    import hashlib

    from onnx import numpy_helper

    digest = hashlib.sha256()
    for init in model.graph.initializer:
        if init.data_type in _FLOAT_TYPES:
            digest.update(init.name.encode() + numpy_helper.to_array(init).tobytes())
    return digest.hexdigest()


def _graph_inputs(model: Any) -> list[Any]:
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _used_names(model: Any) -> set[str]:
    used = {name for node in model.graph.node for name in node.input}
    return used | {output.name for output in model.graph.output}


def _dims(value: Any) -> list[int]:
    """A value's shape with -1 for dynamic dimensions (TensorRT's convention)."""
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def _engine_model(model: Any, *, strip: bool, drop_gemm_bias: bool) -> Any:
    """The model an engine computes: unused inputs dropped, and weights as the build flags leave them."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    used = _used_names(model)
    kept = [value for value in model.graph.input if value.name in used]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    biases = {node.input[2] for node in model.graph.node if node.op_type == "Gemm" and len(node.input) > 2}
    for index, init in enumerate(model.graph.initializer):
        if init.data_type not in _FLOAT_TYPES:
            continue  # shape constants are not weights: TensorRT keeps them
        if strip or (drop_gemm_bias and init.name in biases):
            zeros = np.zeros_like(numpy_helper.to_array(init))
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(zeros, init.name))
    return model


def _rounded_to_fp16(model: Any) -> Any:
    """``model`` computing as a weakly typed ``FP16`` build may: every float weight and every float tensor
    a layer writes rounded to fp16 (fp32 I/O kept), whatever precision the graph asked for."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(onnx.ModelProto.FromString(model.SerializeToString()))
    graph = model.graph
    floats = {v.name for v in [*graph.value_info, *graph.output] if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    for index, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            value = numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(value, init.name))
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for position, name in enumerate(node.output):
            if name in floats:
                node.output[position] = f"{name}__raw"
                nodes.append(helper.make_node("Cast", [f"{name}__raw"], [f"{name}__half"], to=TensorProto.FLOAT16))
                nodes.append(helper.make_node("Cast", [f"{name}__half"], [name], to=TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    return model


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

    class Engine:
        def __init__(self, header: dict[str, Any], onnx_bytes: bytes) -> None:
            import onnx

            self.header = header
            self.model = onnx.load_from_string(onnx_bytes)
            self._session: Any = None
            self.refitted = False
            self.io: dict[str, tuple[str, str, list[int]]] = {}  # name -> (mode, dtype, shape)
            for value in self.model.graph.input:
                self.io[value.name] = ("INPUT", _DTYPES[value.type.tensor_type.elem_type], _dims(value))
            for value in self.model.graph.output:
                self.io[value.name] = ("OUTPUT", _DTYPES[value.type.tensor_type.elem_type], _dims(value))

        @property
        def num_io_tensors(self) -> int:
            return len(self.io)

        def get_tensor_name(self, index: int) -> str:
            return list(self.io)[index]

        def get_tensor_mode(self, name: str) -> str:
            return self.io[name][0] if name in self.io else "NONE"

        def get_tensor_dtype(self, name: str) -> str:
            return self.io[name][1]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return tuple(self.io[name][2])

        def session(self) -> Any:
            if self._session is None:
                import onnxruntime as ort

                model, options = self.model, ort.SessionOptions()
                if self.header.get("weak_fp16"):
                    model = _rounded_to_fp16(model)
                    # no graph rewrites: ONNX Runtime could fold a Cast pair, and with it the fp16 rounding
                    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                self._session = ort.InferenceSession(
                    model.SerializeToString(), options, providers=["CPUExecutionProvider"]
                )
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
            self._inferred: dict[tuple[Any, ...], dict[str, tuple[int, ...]]] = {}

        def set_optimization_profile_async(self, index: int, stream: int) -> bool:
            if not 0 <= index < len(self.engine.header["profiles"]):
                return False
            self.profile = index
            return True

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            if self.engine.get_tensor_mode(name) != "INPUT":
                return False  # TensorRT logs "... is not an input tensor of the engine" and refuses
            bounds = self.engine.header["profiles"][self.profile or 0].get(name)
            if bounds is not None:
                low, _, high = bounds
                if len(shape) != len(low) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high, strict=True)):
                    return False  # "... is out of the range of the optimization profile"
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name: str, address: int) -> bool:
            why = (
                "not an I/O tensor of the engine" if self.engine.get_tensor_mode(name) == "NONE"
                else "null" if not address
                else f"not {ALIGNMENT}-byte aligned" if int(address) % ALIGNMENT
                else None
            )  # fmt: skip
            if why is not None:
                state.refused_addresses.append((name, int(address), why))
                return False
            self.addresses[name] = int(address)
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            """An input's set shape; an output's shape from the inputs' (-1s while any is unset)."""
            if self.engine.get_tensor_mode(name) == "INPUT":
                return self.shapes.get(name, self.engine.get_tensor_shape(name))
            inputs = [n for n, (mode, _, _) in self.engine.io.items() if mode == "INPUT"]
            if any(n not in self.shapes for n in inputs):
                return self.engine.get_tensor_shape(name)
            key = tuple(sorted((n, self.shapes[n]) for n in inputs))
            if key not in self._inferred:
                self._inferred[key] = self._infer(dict(key))
            return self._inferred[key][name]

        def _infer(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
            import numpy as np

            session = self.engine.session()
            feeds = {
                spec.name: np.zeros(shapes[spec.name], _NUMPY[spec.type]) for spec in session.get_inputs()
            }  # the engine's real computation: the shapes it writes, whatever the graph declares
            values = session.run(None, feeds)
            return {
                output.name: tuple(value.shape) for output, value in zip(session.get_outputs(), values, strict=True)
            }

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
