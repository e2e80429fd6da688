"""fp16 ONNX graphs: the conversion (fp32 I/O, overflow guards, fp32 timestep embedding), a topological
sort the converter's output needs, and the activation-range check that refuses an export fp16 cannot hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from difftool.core.errors import ModelError

#: Kept in fp32 in fp16 exports (the usual overflow guards): normalisations sum squares that overflow
#: fp16's 65504, softmax exponentiates; the inputs and output stay fp32 too (casts inside the graph).
FP32_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax", "ReduceMean", "Pow")
#: Weights above this size go to an external data file beside model.onnx.
EXTERNAL_DATA_BYTES = 1_800_000_000


def timestep_nodes(graph: Any) -> list[str]:
    """Nodes computing the sinusoidal timestep embedding (up to the first matmul): they stay fp32.

    ``sin(t * f)`` with t up to 999 needs fp32: fp16 has a spacing of 0.5 there, which scrambles the
    embedding (the usual fp16 failure of diffusion U-Nets besides overflowing normalisations).
    """
    derived, names = {"timestep"}, []
    for node in graph.node:  # ONNX keeps nodes in topological order
        if node.op_type in ("Gemm", "MatMul", "Conv") or not derived.intersection(node.input):
            continue
        names.append(node.name)
        derived.update(node.output)
    return names


def to_fp16(path: Path, external: bool) -> None:
    """Convert the fp32 export at ``path`` to fp16 in place, with fp32 inputs/output and overflow guards."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(path))
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS],
        node_block_list=timestep_nodes(model.graph),
        disable_shape_infer=external,  # onnx's shape inference cannot take a model over 2 GB
    )
    sort_nodes(converted.graph)
    for data in path.parent.glob("*.data"):
        data.unlink()
    big = external or converted.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save(converted, str(path), save_as_external_data=big, location=f"{path.name}.data")


def sort_nodes(graph: Any) -> None:
    """Put ``graph``'s nodes in topological order, in place, as the ONNX spec requires.

    ONNX Runtime's fp16 converter appends the casts of kept-fp32 inputs after the nodes that read
    them; ONNX Runtime tolerates that, ``onnx.checker`` and strict parsers do not. onnx has no sort.
    """
    import collections

    produced_by = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    waiting_on = [{produced_by[n] for n in _reads(node) if n in produced_by} - {i} for i, node in enumerate(graph.node)]
    readers: dict[int, list[int]] = {}
    for i, needs in enumerate(waiting_on):
        for j in needs:
            readers.setdefault(j, []).append(i)
    ready = collections.deque(i for i, needs in enumerate(waiting_on) if not needs)
    order: list[int] = []
    while ready:  # Kahn's algorithm, keeping the original order among ready nodes where it can
        i = ready.popleft()
        order.append(i)
        for k in readers.get(i, ()):
            waiting_on[k].discard(i)
            if not waiting_on[k]:
                ready.append(k)
    if len(order) != len(graph.node):
        raise ModelError("the ONNX export has a cycle", "report this model")
    ordered = [graph.node[i] for i in order]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def _reads(node: Any) -> set[str]:
    """The values ``node`` reads: its inputs (``""`` is an omitted optional one) and, for control flow
    (``If``, ``Loop``, ``Scan``), the outer-scope values its subgraphs read."""
    names = {n for n in node.input if n}
    for attribute in node.attribute:
        for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            local = {i.name for i in subgraph.input} | {i.name for i in subgraph.initializer}
            for inner in subgraph.node:
                local |= set(inner.output)
            names |= {n for inner in subgraph.node for n in _reads(inner)} - local
    return names


#: Largest finite fp16 value.
FP16_MAX = 65504.0
_FP32_MODULES = (torch.nn.GroupNorm, torch.nn.LayerNorm)


@contextlib.contextmanager
def activation_peaks(module: torch.nn.Module) -> Iterator[dict[str, float]]:
    """Record each leaf module's largest absolute output while the block runs (fp32 reference)."""
    peaks: dict[str, float] = {}
    handles = []
    for name, leaf in module.named_modules():
        if next(leaf.children(), None) is not None or isinstance(leaf, _FP32_MODULES):
            continue

        def hook(_: Any, __: Any, output: Any, name: str = name) -> None:
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                peaks[name] = max(peaks.get(name, 0.0), float(output.detach().abs().max()))

        handles.append(leaf.register_forward_hook(hook))
    try:
        yield peaks
    finally:
        for handle in handles:
            handle.remove()


def check_fp16_range(peaks: dict[str, float], shape: list[int]) -> None:
    """Fail when an activation computed in fp16 would exceed fp16's range.

    ONNX Runtime's CPU provider computes most fp16 ops in fp32 (it inserts casts and drops redundant
    ones), so a CPU run hides overflows a GPU would hit; the fp32 reference's activations do not.
    """
    over = {name: peak for name, peak in peaks.items() if peak > FP16_MAX}
    if over:
        name, peak = max(over.items(), key=lambda item: item[1])
        raise ModelError(
            f"the fp16 ONNX export overflows: {name} reaches {peak:.3g} (fp16 max {FP16_MAX:.0f}) at input shape "
            f"{shape}",
            "export in fp32 (--precision fp32, or --dtype fp32 on the run)",
        )
