"""Binding torch tensors to a TensorRT engine: the engine's own I/O tensors, checked, aligned and shaped.

An engine is not always the graph it was built from: TensorRT drops inputs no layer reads, and an
engine built from another export may name or type its tensors differently. So every runner reads the
engine's I/O tensors at load (:class:`EngineIO`), binds only what the engine has, in the engine's
dtypes, at 256-byte aligned addresses (``setTensorAddress`` refuses anything else), and checks the
shape TensorRT will write into each output before giving it the address.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from difftool.core.errors import BackendUnavailableError

#: ``IExecutionContext.setTensorAddress`` needs this alignment (bytes) for every I/O tensor.
ALIGNMENT = 256
_TORCH = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32"}
CLEAR = "clear the engine with `difftool cache clear` to rebuild it"


def _check(accepted: bool, what: str) -> None:
    """TensorRT's setters return ``False`` (and log why) instead of raising."""
    if not accepted:
        raise BackendUnavailableError(f"TensorRT refused {what} (see its log above)", "report it with `difftool info`")


@dataclass(frozen=True)
class EngineIO:
    """An engine's I/O tensors by name, with their TensorRT dtype names (``FLOAT``, ``HALF``, ...)."""

    name: str
    inputs: dict[str, str]
    outputs: dict[str, str]

    @classmethod
    def of(cls, engine: Any, name: str = "the engine") -> EngineIO:
        import tensorrt as trt

        inputs: dict[str, str] = {}
        outputs: dict[str, str] = {}
        for index in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(index)
            dtype = engine.get_tensor_dtype(tensor)
            dtype = getattr(dtype, "name", str(dtype).rpartition(".")[2])
            (inputs if engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT else outputs)[tensor] = dtype
        return cls(name, inputs, outputs)

    def expect(self, provided: Iterable[str], outputs: Iterable[str] | None = None) -> None:
        """Refuse, in one line, an engine needing an input difftool does not give or lacking an output.

        Inputs difftool gives that the engine lacks were dropped by TensorRT (no layer reads them) and
        are not bound. ``outputs`` ``None``: any single output (a U-Net's, whatever its name).
        """
        missing = sorted(set(self.inputs) - set(provided))
        if missing:
            raise BackendUnavailableError(
                f"TensorRT engine {self.name} takes {', '.join(missing)}, which difftool does not give it", CLEAR
            )
        wanted = sorted(outputs) if outputs is not None else None
        if (wanted is None and len(self.outputs) != 1) or (wanted is not None and sorted(self.outputs) != wanted):
            raise BackendUnavailableError(
                f"TensorRT engine {self.name} outputs {', '.join(sorted(self.outputs)) or 'nothing'}, "
                f"not {', '.join(wanted) if wanted else 'one tensor'}",
                CLEAR,
            )
        for tensor, dtype in {**self.inputs, **self.outputs}.items():
            if dtype not in _TORCH:
                raise BackendUnavailableError(f"TensorRT engine {self.name}'s {tensor} is {dtype}", CLEAR)

    def dtype(self, tensor: str) -> Any:
        import torch

        return getattr(torch, _TORCH[{**self.inputs, **self.outputs}[tensor]])

    @property
    def output(self) -> str:
        """The only output's name (a U-Net's: "out" in difftool's exports)."""
        return next(iter(self.outputs))


def aligned(tensor: Any) -> Any:
    """``tensor`` if its address suits TensorRT, else an aligned copy (a view at an offset often is not)."""
    if tensor.data_ptr() % ALIGNMENT == 0 and tensor.is_contiguous():
        return tensor
    copy = aligned_empty(tuple(tensor.shape), tensor.dtype, tensor.device)
    copy.copy_(tensor)
    return copy


def aligned_empty(shape: tuple[int, ...], dtype: Any, device: Any) -> Any:
    """An uninitialised contiguous tensor at a 256-byte aligned address (CUDA's allocator gives one;
    a CPU tensor, as the GPU stand-ins use, is carved out of a slightly larger buffer)."""
    import torch

    tensor = torch.empty(shape, dtype=dtype, device=device)
    if tensor.data_ptr() % ALIGNMENT == 0:
        return tensor
    size = tensor.element_size() * tensor.numel()
    raw = torch.empty(size + ALIGNMENT, dtype=torch.uint8, device=device)
    offset = -raw.data_ptr() % ALIGNMENT
    return raw[offset : offset + size].view(dtype).view(shape)


def bind_inputs(context: Any, io: EngineIO, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Set each engine input's shape and address; returns the tensors bound (keep them referenced
    until the launch has run: they may be copies)."""
    bound = {}
    for name, tensor in inputs.items():
        if name not in io.inputs:
            continue  # an input TensorRT dropped: no layer of the engine reads it
        tensor = aligned(tensor.to(io.dtype(name)))
        _check(context.set_input_shape(name, tuple(tensor.shape)), f"{name} of shape {list(tensor.shape)}")
        _check(context.set_tensor_address(name, tensor.data_ptr()), f"the address of {name}")
        bound[name] = tensor
    return bound


def bind_outputs(context: Any, io: EngineIO, outputs: Mapping[str, Any]) -> None:
    """Give each output's address once TensorRT agrees on the shape it will write there."""
    for name, tensor in outputs.items():
        shape = [int(d) for d in context.get_tensor_shape(name)]
        if shape != list(tensor.shape):
            raise BackendUnavailableError(
                f"TensorRT engine {io.name} would write {name} as {shape}, not {list(tensor.shape)}", CLEAR
            )
        _check(context.set_tensor_address(name, tensor.data_ptr()), f"the address of {name}")
