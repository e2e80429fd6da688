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
- weights: ``REFIT`` engines take other weights of the same graph structure, from an ONNX file or by
  name (:class:`Refitter`: prototype types and counts, missing weights); ``REFIT_IDENTICAL``
  engines only their build weights (TensorRT calls anything else undefined: refused here);
  ``STRIP_PLAN`` leaves the refittable (float) weights out of the plan, so a stripped engine computes
  with zeros until it is refitted; on TensorRT 11.3+ a ``REFIT`` engine drops GEMM biases, the known
  issue NVIDIA documents (``REFIT_IDENTICAL`` does not have it);
- engine: its I/O tensors (``num_io_tensors``, ``get_tensor_name/mode/dtype/shape``);
- context: ``set_input_shape`` inside the selected profile, ``set_tensor_address`` returning ``False``
  for an unknown name, a null or a not 256-byte aligned address; ``get_tensor_shape`` of an output
  once the inputs' shapes are set; every I/O tensor bound before ``execute_async_v3``;
- timing caches: entries per build, ``combine``, serialized with the version they came from;
- parser: opsets 9 to 22 of the default ONNX domain only; an operator onnx-tensorrt has no importer for
  (an ONNX Runtime contrib op, ``Unique``, the sequence ops...) fails the parse, as on a GPU;
- streams (with :class:`~difftool.testing.gpu.FakeCuda`): ``execute_async_v3`` only enqueues; the work
  runs when its stream is synchronized or waited for, so a read not ordered after it finds no output.

The build side lives in :mod:`difftool.testing.fake_tensorrt_builder`, engines and contexts in
:mod:`difftool.testing.fake_tensorrt_engine`.

Bound memory is read and written by pointer, as TensorRT does. Used through
:func:`difftool.testing.gpu.gpu_harness`.
"""

from __future__ import annotations

import json
import types
from typing import Any, ClassVar

from difftool.testing.fake_tensorrt_builder import _MAGIC, Builder, OnnxParser, _Errors
from difftool.testing.fake_tensorrt_engine import _DTYPES, _FLOAT_TYPES, Engine, _engine_model, _structure, _weights
from difftool.testing.fake_tensorrt_state import FakeTensorRTState


class Logger:
    WARNING, ERROR, INFO = 2, 1, 3

    def __init__(self, severity: int = 2) -> None:
        self.severity = severity


class IProgressMonitor:
    def __init__(self) -> None:
        pass


def fake_tensorrt(state: FakeTensorRTState) -> types.ModuleType:
    """A ``tensorrt`` module imitating version ``state.version`` (10.x: precision flags; 11.x: strongly typed)."""
    import importlib.machinery

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = state.version  # type: ignore[attr-defined]
    trt.__dict__["_fake_state"] = state
    flag_names = ["REFIT", "REFIT_IDENTICAL", "STRIP_PLAN", "TF32", "DEBUG"]
    flag_names += ["FP16", "BF16", "INT8", "FP8"] if state.release < (11, 0) else []
    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.IProgressMonitor = IProgressMonitor  # type: ignore[attr-defined]
    trt.BuilderFlag = types.SimpleNamespace(**{n: n for n in flag_names})  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
    trt.TensorIOMode = types.SimpleNamespace(NONE="NONE", INPUT="INPUT", OUTPUT="OUTPUT")  # type: ignore[attr-defined]
    trt.DataType = types.SimpleNamespace(**{n: n for n in _DTYPES.values()})  # type: ignore[attr-defined]
    # The classes that create state-bound objects carry this fake's state (one module per harness).
    trt.Builder = type("Builder", (Builder,), {"state": state})  # type: ignore[attr-defined]
    trt.Runtime = type("Runtime", (Runtime,), {"state": state})  # type: ignore[attr-defined]
    trt.OnnxParser = OnnxParser  # type: ignore[attr-defined]
    trt.Refitter = Refitter  # type: ignore[attr-defined]
    trt.Weights = Weights  # type: ignore[attr-defined]
    trt.OnnxParserRefitter = OnnxParserRefitter  # type: ignore[attr-defined]
    return trt


class Runtime:
    #: The fake's state: :func:`fake_tensorrt` binds it in a subclass.
    state: ClassVar[FakeTensorRTState]

    def __init__(self, logger: Any) -> None:
        self.state.created_on.append(("runtime", self.state.cuda.current_index))

    def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
        if "deserialize" in self.state.fail or not data.startswith(_MAGIC):
            return None
        size = int.from_bytes(data[8:16], "little")
        header = json.loads(data[16 : 16 + size])
        cuda = self.state.cuda
        if tuple(header["capability"]) != cuda.capability(f"cuda:{cuda.current_index}"):
            return None  # an engine from another GPU architecture
        return Engine(self.state, header, data[16 + size :])


class Weights:
    """``trt.Weights(dtype, ptr, count)``: host memory TensorRT reads when the refit runs, not before."""

    def __init__(self, dtype: Any = "FLOAT", ptr: int = 0, count: int = 0) -> None:
        self.dtype, self.ptr, self.count = dtype, int(ptr), int(count)


class Refitter:
    """TensorRT's refitter: from an ONNX file (:class:`OnnxParserRefitter`) or weight by weight by name.

    By name, as TensorRT: only the engine's refittable (float) weights, each of its prototype's type and
    count (``set_named_weights`` returns ``False`` otherwise); ``get_missing_weights`` lists what must be
    set before ``refit_cuda_engine`` succeeds: every weight of a stripped plan, and for the others each
    weight a layer combines with one that was set (the stand-in's rule: the weights of one node)."""

    def __init__(self, engine: Engine, logger: Any) -> None:
        if engine.header["refit"] is None:
            raise RuntimeError("TensorRT: the engine was not built refittable")
        self.engine = engine
        self.pending: Any = None
        self.named: dict[str, Weights] = {}
        self._weights = {i.name: i for i in engine.model.graph.initializer if i.data_type in _FLOAT_TYPES}

    def get_all_weights(self) -> list[str]:
        return list(self._weights)

    def get_weights_prototype(self, name: str) -> Weights:
        init = self._weights.get(name)
        if init is None:
            return Weights("FLOAT", 0, -1)  # TensorRT: count -1 for a name it has no refittable weights of
        count = 1
        for dim in init.dims:
            count *= int(dim)
        return Weights(_DTYPES[init.data_type], 0, count)

    def set_named_weights(self, name: str, weights: Weights) -> bool:
        prototype = self.get_weights_prototype(name)
        if prototype.count < 0 or weights.count != prototype.count or weights.dtype != prototype.dtype:
            return False  # unknown name, another count, or another type than the prototype's: refused
        self.named[name] = weights
        return True

    def get_missing_weights(self) -> list[str]:
        if self.engine.header.get("stripped"):
            return [name for name in self._weights if name not in self.named]
        combined = {
            other
            for node in self.engine.model.graph.node
            if any(name in self.named for name in node.input)
            for other in node.input
            if other in self._weights
        }
        return sorted(combined - set(self.named))

    def refit_cuda_engine(self) -> bool:
        header = self.engine.header
        if self.named:
            if self.get_missing_weights():
                return False
            self.pending = _with_weights(self.engine.model, self.named)
            self.named = {}
            if header["refit"] == "REFIT_IDENTICAL" and _weights(self.pending) != header["weights"]:
                return False  # undefined in TensorRT: refused here so nothing depends on it
        if self.pending is None:
            return False
        self.engine.model = _engine_model(self.pending, strip=False, drop_gemm_bias=header["drops_gemm_bias"])
        self.engine._session, self.engine.refitted = None, True
        self.engine.state.refits += 1
        return True


def _with_weights(model: Any, named: dict[str, Weights]) -> Any:
    """``model`` with the named weights read from host memory now (TensorRT copies them at refit)."""
    import ctypes

    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    numpy = {"FLOAT": np.float32, "HALF": np.float16}
    for index, init in enumerate(model.graph.initializer):
        weights = named.get(init.name)
        if weights is None:
            continue
        dtype = numpy[weights.dtype]
        raw = (ctypes.c_uint8 * (weights.count * np.dtype(dtype).itemsize)).from_address(weights.ptr)
        value = np.frombuffer(raw, dtype=dtype).reshape(tuple(init.dims)).copy()
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, init.name))
    return model


class OnnxParserRefitter(_Errors):
    def __init__(self, refitter: Refitter, logger: Any) -> None:
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
