"""Export any torch module with named tensor inputs/outputs to ONNX, validated and cached.

The U-Net has its own exporter (:mod:`difftool.exporters.onnx`, with its signature and profiles);
this one serves the parts around it that a whole-pipeline export also needs (text encoders, VAE
decoder): the caller describes the inputs, their dynamic axes and the outputs in a
:class:`ModuleSpec`, and gets back a cache entry whose manifest holds the validation errors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difftool.core.errors import ModelError
from difftool.exporters.cache import ArtifactCache, Entry
from difftool.exporters.onnx import EXTERNAL_DATA_BYTES, OPSET

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class ModuleSpec:
    """What to export: example inputs, dynamic axes, output names and the inputs to validate on.

    Example inputs should use a batch of 2 or more: torch.export specialises sizes 0 and 1.
    """

    inputs: Mapping[str, torch.Tensor]
    #: input name -> {axis: (dimension name, min, max)}
    dynamic: Mapping[str, Mapping[int, tuple[str, int, int]]]
    outputs: tuple[str, ...]
    checks: tuple[Mapping[str, torch.Tensor], ...]
    tolerance: float = 1e-4
    #: ``dynamo`` (torch.export) or ``torchscript``, the tracing exporter, for networks torch.export
    #: cannot take (torch 2.13 crashes the process on SPAN's decomposition; see upscalers.py).
    exporter: str = "dynamo"

    def dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        dims: dict[str, Any] = {}
        shapes = []
        for name in self.inputs:
            axes = {}
            for axis, (dim, low, high) in self.dynamic.get(name, {}).items():
                dims.setdefault(dim, torch.export.Dim(dim, min=low, max=high))
                axes[axis] = dims[dim]
            shapes.append(axes)
        return tuple(shapes)


def export_module(graph: torch.nn.Module, path: Path, spec: ModuleSpec) -> None:
    """Write ``graph`` (positional inputs in ``spec.inputs`` order) as ONNX at ``path``."""
    external = sum(p.numel() * p.element_size() for p in graph.parameters()) > EXTERNAL_DATA_BYTES
    if spec.exporter == "torchscript":
        axes = {name: {axis: dim for axis, (dim, _, _) in dims.items()} for name, dims in spec.dynamic.items()}
        with torch.no_grad():
            torch.onnx.export(
                graph,
                tuple(spec.inputs.values()),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_axes=axes,
            )
        return
    with torch.no_grad():
        program = torch.onnx.export(
            graph,
            tuple(spec.inputs.values()),
            dynamo=True,
            opset_version=OPSET,
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_shapes=spec.dynamic_shapes(),
            verbose=False,
        )
    program.save(str(path), external_data=external)


def validate_module(graph: torch.nn.Module, path: Path, spec: ModuleSpec) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch on ``spec.checks``; raise if any output is over tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    report: dict[str, Any] = {"tolerance": spec.tolerance, "checks": []}
    for inputs in spec.checks:
        with torch.no_grad():
            expected = graph(*inputs.values())
        expected = expected if isinstance(expected, tuple) else (expected,)
        actual = session.run(None, {name: t.numpy() for name, t in inputs.items()})
        errors = {}
        for name, want, got in zip(spec.outputs, expected, actual, strict=True):
            want = want.numpy()
            errors[name] = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-6))
        shapes = {name: list(t.shape) for name, t in inputs.items()}
        report["checks"].append({"shapes": shapes, "relative_error": errors})
    worst = max(e for check in report["checks"] for e in check["relative_error"].values())
    report["max_relative_error"] = worst
    if worst > spec.tolerance:
        raise ModelError(
            f"the ONNX export of {path.parent.name} differs from PyTorch by {worst:.2e} (relative), over the "
            f"tolerance {spec.tolerance:.0e}",
            "report this model; use --backend torch meanwhile",
        )
    return report


def cached_module_export(
    make_graph: Callable[[], torch.nn.Module],
    name: str,
    spec: ModuleSpec,
    model_id: str,
    cache: ArtifactCache | None = None,
) -> Entry:
    """The validated ONNX export of ``make_graph()`` from the cache, exported on first use.

    ``model_id`` identifies the weights (the graph is only built when an export is needed).
    """
    import onnx
    import onnxruntime

    components = {
        "weights": model_id,
        "inputs": {k: [str(v.dtype), v.ndim] for k, v in spec.inputs.items()},
        "dynamic": {k: {str(a): list(d) for a, d in v.items()} for k, v in spec.dynamic.items()},
        "outputs": list(spec.outputs),
        "exporter": spec.exporter,
        "opset": OPSET,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "format": 1,
    }

    def build(folder: Path) -> dict[str, Any]:
        started = time.perf_counter()
        graph = make_graph()
        export_module(graph, folder / MODEL_FILE, spec)
        report = validate_module(graph, folder / MODEL_FILE, spec)
        return {"validation": report, "seconds": round(time.perf_counter() - started, 2)}

    return (cache or ArtifactCache()).get_or_build("onnx", name, components, build)
