"""Every backend that turns a U-Net into a denoiser passes the same conformance suite (difftool.testing).

TensorRT runs with the hardware stand-ins of difftool.testing.gpu (a CUDA runtime and a ``tensorrt``
module over ONNX Runtime); on a GPU machine the same suite runs the real thing (marked ``gpu``).
"""

from __future__ import annotations

import pytest

from difftool.plugins.builtin.backends import OnnxBackend, TensorRTBackend, TorchBackend
from difftool.testing import BackendConformance
from difftool.testing.gpu import gpu_harness

pytest.importorskip("onnxruntime")


class TestTorch(BackendConformance):
    def make_backend(self):
        return TorchBackend()


class TestOnnxRuntime(BackendConformance):
    def make_backend(self):
        return OnnxBackend()


class TestTensorRTOnTheStandIns(BackendConformance):
    device = "cuda"
    options = {"cuda_graphs": "off"}

    def make_backend(self):
        return TensorRTBackend()

    def environment(self):
        return gpu_harness()
