"""The stand-in's engines and execution contexts (see :mod:`difftool.testing.fake_tensorrt`), and the ONNX
graph handling they share with its builder: structure and weights fingerprints, what a plan keeps
(``STRIP_PLAN``, TensorRT 11.3's dropped GEMM biases) and the fp16 rounding of a weakly typed build."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from difftool.testing.fake_tensorrt_state import FakeTensorRTState

_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
_CTYPES = {"float32": ctypes.c_float, "float16": ctypes.c_uint16, "int64": ctypes.c_int64}
#: ONNX element types -> TensorRT's DataType names.
_DTYPES = {1: "FLOAT", 10: "HALF", 7: "INT64", 6: "INT32", 16: "BF16"}
_FLOAT_TYPES = {1, 10, 16}  # the initializers a refit updates (and STRIP_PLAN leaves out)
#: TensorRT's ``setTensorAddress`` alignment.
ALIGNMENT = 256


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


class Engine:
    """A deserialized engine: its header (profiles, flags, weights) and the ONNX graph it runs."""

    def __init__(self, state: FakeTensorRTState, header: dict[str, Any], onnx_bytes: bytes) -> None:
        import onnx

        self.state = state
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
        state = self.state
        state.created_on.append(("context", state.cuda.current_index))
        if "context" in state.fail:
            return None
        return Context(self)

class Context:
    """An execution context: shapes in the selected profile, bound addresses, execution by pointer."""

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
            self.engine.state.refused_addresses.append((name, int(address), why))
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
        state, cuda = self.engine.state, self.engine.state.cuda
        if cuda.capturing is not None:
            if "capture" in state.fail:
                return False  # an enqueue TensorRT cannot capture
            snapshot = (dict(self.shapes), dict(self.addresses))
            cuda.capturing.launches.append(lambda: self._run(*snapshot))
            return True
        session = self.engine.session()
        if any(spec.name not in self.shapes or spec.name not in self.addresses for spec in session.get_inputs()):
            return False  # an unbound input: TensorRT refuses to enqueue
        if any(output.name not in self.addresses for output in session.get_outputs()):
            return False  # an unbound output: TensorRT refuses to enqueue
        snapshot = (dict(self.shapes), dict(self.addresses))  # the bindings as they are now, read when it runs
        cuda.enqueue(stream, lambda: self._run(*snapshot))  # runs when the stream is synchronized or waited for
        return True

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
        self.engine.state.executions += 1
        self.engine.state.executed.append((tuple(feeds), tuple(output.name for output in outputs)))
        return True
