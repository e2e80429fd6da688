"""A Triton Inference Server model repository for a task's exported U-Net.

Layout (Triton's)::

    REPO/<name>/config.pbtxt        inputs, outputs, dynamic batching, instance groups
    REPO/<name>/<version>/model.onnx
    REPO/<name>/<version>/model.plan   (when a TensorRT engine was built for it; platform tensorrt_plan)

The ONNX model is the validated, cached export (:func:`difftool.exporters.onnx.cached_export`), so
Triton serves exactly what difftool checked against PyTorch. Every input has a leading batch
dimension (the timestep too: one per sample), so Triton may stack requests of the same image size.
The repository is written into a temp folder and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from difftool.core.atomic import replace_dir
from difftool.exporters.onnx import UNetSignature

DTYPES = {"sample": "TYPE_FP32", "timestep": "TYPE_FP32", "class_labels": "TYPE_INT64"}


@dataclass(frozen=True)
class TritonOptions:
    max_batch_size: int = 8
    instances: int = 1
    kind: str = "KIND_CPU"  # or KIND_GPU
    max_queue_delay_us: int = 2000
    version: int = 1


def config_text(
    name: str,
    signature: UNetSignature,
    options: TritonOptions,
    platform: str = "onnxruntime_onnx",
    weights_id: str = "",
) -> str:
    """``config.pbtxt`` in protobuf text format (Triton's ``ModelConfig``).

    ``weights_id`` goes into ``parameters`` as ``difftool_weights``: difftool's Triton backend serves a
    model only from the server model whose id matches the weights it was asked to run.
    """
    dims = {"sample": f"[ {signature.in_channels}, -1, -1 ]", "timestep": "[ 1 ]", "class_labels": "[ 1 ]"}
    inputs = []
    for input_name in signature.input_names():
        reshape = "\n    reshape: { shape: [ ] }" if input_name != "sample" else ""
        inputs.append(
            f'  {{\n    name: "{input_name}"\n    data_type: {DTYPES[input_name]}\n'
            f"    dims: {dims[input_name]}{reshape}\n  }}"
        )
    joined = ",\n".join(inputs)
    return (
        f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {options.max_batch_size}\n'
        f"input [\n{joined}\n]\n"
        f'output [\n  {{\n    name: "out"\n    data_type: TYPE_FP32\n'
        f"    dims: [ {signature.out_channels}, -1, -1 ]\n  }}\n]\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {options.max_queue_delay_us}\n}}\n"
        f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {options.kind}\n  }}\n]\n"
        f"version_policy: {{ latest: {{ num_versions: 1 }} }}\n"
        f'parameters: {{ key: "difftool_weights" value: {{ string_value: "{weights_id}" }} }}\n'
    )


def write_repository(
    repo: str | os.PathLike[str],
    name: str,
    onnx_file: Path,
    signature: UNetSignature,
    options: TritonOptions = TritonOptions(),
    plan_file: Path | None = None,
    weights_id: str = "",
) -> Path:
    """Write (or replace) model ``name`` in the repository ``repo``; returns the model's folder."""
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=repo, prefix=f".{name}."))
    try:
        version = tmp / str(options.version)
        version.mkdir()
        shutil.copyfile(onnx_file, version / "model.onnx")
        (tmp / "config.pbtxt").write_text(config_text(name, signature, options, weights_id=weights_id))
        if plan_file is not None:
            plan_name = f"{name}_trt"
            plan_dir = Path(tempfile.mkdtemp(dir=repo, prefix=f".{plan_name}."))
            (plan_dir / str(options.version)).mkdir()
            shutil.copyfile(plan_file, plan_dir / str(options.version) / "model.plan")
            plan_config = config_text(plan_name, signature, options, "tensorrt_plan", weights_id)
            (plan_dir / "config.pbtxt").write_text(plan_config)
            replace_dir(plan_dir, repo / plan_name)
        return replace_dir(tmp, repo / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
