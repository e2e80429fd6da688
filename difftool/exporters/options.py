"""The declared options of the ONNX Runtime and TensorRT backends (also the TensorRT exporter's).

Kept beside the engines they configure; the backends in :mod:`difftool.plugins.builtin.backends` and
the exporters declare them. Each option's ``env`` variable, when set, is its default.
"""

from __future__ import annotations

from difftool.core.task import Param


def _auto_on_off(name: str, env: str, help: str) -> Param:
    return Param(name, "choice", default="auto", choices=("auto", "on", "off"), env=env, help=help)


#: ONNX Runtime's options, shared by ``onnx`` and the ONNX parts of ``tensorrt`` runs.
ORT_OPTIONS = (
    Param(
        "provider",
        "choice",
        default="auto",
        choices=("auto", "cpu", "cuda", "tensorrt"),
        env="DIFFTOOL_ORT_PROVIDER",
        help="ONNX Runtime execution provider (auto: CUDA on cuda devices, else CPU)",
    ),
    Param("threads", "int", default=0, min=0, max=1024, env="DIFFTOOL_ORT_THREADS", help="intra-op threads (0: all)"),
)

#: TensorRT's options (the ``tensorrt`` backend and ``difftool export tensorrt``).
TENSORRT_OPTIONS = (
    Param(
        "max_size",
        "int",
        default=1024,
        min=64,
        max=16384,
        env="DIFFTOOL_TRT_MAX_SIZE",
        help="largest image side (px) an engine accepts when the task declares no shapes",
    ),
    Param(
        "workspace_gb",
        "float",
        default=0.0,
        min=0.0,
        max=1024.0,
        env="DIFFTOOL_TRT_WORKSPACE_GB",
        help="builder workspace in GiB (0: 60% of the GPU's free memory)",
    ),
    _auto_on_off("refit", "DIFFTOOL_TRT_REFIT", "refittable engines (auto: Stable Diffusion, TensorRT < 11.3)"),
    _auto_on_off("cuda_graphs", "DIFFTOOL_TRT_CUDA_GRAPH", "replay CUDA graphs (auto: when the shapes are static)"),
)
