"""Issue 30: the defects real TensorRT and ONNX Runtime would expose, each shown on the CPU.

The stand-ins replace only the hardware boundary (the ``tensorrt`` module and the CUDA runtime, see
:mod:`difftool.testing.gpu`); ONNX Runtime's GPU providers, which this machine lacks, are replaced by a
recorder of the options difftool hands ``InferenceSession``: what a real session would be given.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from difftool.core.errors import BackendUnavailableError
from difftool.exporters.cache import ArtifactCache

pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("DIFFTOOL_CACHE", str(root))
    return root


def _tiny_sd_unet(seed: int) -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "builtin"))
    from sd import tiny

    return tiny.components(seed=seed)["unet"]


def _conv_export(folder: Path, weight: float) -> dict[str, Any]:
    """A one-Conv ONNX graph named like every export (``model.onnx``, same node and tensor names)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    kernel = numpy_helper.from_array(np.full((3, 3, 1, 1), weight, np.float32), "conv.weight")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["sample", "conv.weight"], ["out"], name="conv")],
        "unet",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["b", 3, "h", "w"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 3, "h", "w"])],
        [kernel],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder / "model.onnx")
    return {}


class RecordingSession:
    """``onnxruntime.InferenceSession`` as a GPU build would create it: records the providers it is given."""

    created: list[list[Any]] = []

    def __init__(self, path: str, options: Any = None, providers: Any = None) -> None:
        self.providers = providers
        RecordingSession.created.append(providers)

    def get_providers(self) -> list[str]:
        return [p if isinstance(p, str) else p[0] for p in self.providers]


@pytest.fixture
def gpu_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> list[list[Any]]:
    """onnxruntime-gpu's providers, recorded instead of run (this machine has neither GPU nor TensorRT)."""
    import onnxruntime

    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    real = onnxruntime.InferenceSession

    def session(path: Any, options: Any = None, providers: Any = None, **kwargs: Any) -> Any:
        if providers and providers != ["CPUExecutionProvider"]:
            return RecordingSession(path, options, providers)
        return real(path, options, providers=providers, **kwargs)  # exports are validated on the CPU as ever

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    RecordingSession.created = []
    return RecordingSession.created


def _trt_options(providers: list[Any]) -> dict[str, Any]:
    name, options = providers[0]
    assert name == "TensorrtExecutionProvider"
    return options


# --- 1. two models must not share one ONNX Runtime TensorRT engine -------------------------------------


def test_two_fine_tunes_get_their_own_ort_tensorrt_engine_cache(cache: Path, gpu_onnxruntime) -> None:
    """ORT's engine id hashes the file name and graph, not the weights: each export needs its own folder."""
    from difftool.exporters.onnxruntime_denoiser import make_session

    store = ArtifactCache()
    a = store.get_or_build("onnx", "unet-aaaa-fp32", {"weights": "a"}, lambda f: _conv_export(f, 1.0))
    b = store.get_or_build("onnx", "unet-bbbb-fp32", {"weights": "b"}, lambda f: _conv_export(f, 2.0))
    for entry in (a, b):
        make_session(entry.file("model.onnx"), "cuda:0", provider="tensorrt")
    first, second = (_trt_options(p) for p in gpu_onnxruntime)
    assert first["trt_engine_cache_enable"] and second["trt_engine_cache_enable"]
    assert first["trt_engine_cache_path"] != second["trt_engine_cache_path"]
    assert Path(first["trt_engine_cache_path"]) == cache / "ort-tensorrt" / a.path.name
    assert Path(second["trt_engine_cache_path"]) == cache / "ort-tensorrt" / b.path.name
    # tactic timings are not weights: one timing cache for the GPU
    assert first["trt_timing_cache_path"] == second["trt_timing_cache_path"]
    assert Path(first["trt_engine_cache_path"]).is_dir()


# --- 6. the ORT TensorRT provider gets the task's declared profile; TensorRT 11 needs ORT >= 1.27 ------


def test_ort_tensorrt_provider_gets_the_declared_profile(gpu_onnxruntime) -> None:
    from difftool.core.task import ExportShapes
    from difftool.plugins.builtin.backends import OnnxBackend
    from difftool.testing.gpu import gpu_harness

    unet = _tiny_sd_unet(1)
    shapes = ExportShapes(batch=(2, 2, 2), size=(4, 8, 16), tokens=(77, 77, 154))
    with gpu_harness():
        backend = OnnxBackend().resolve("cuda", "fp32", {"provider": "tensorrt"})
        backend.make_denoiser(unet, prediction_type="epsilon", model_id="e" * 64, shapes=shapes)
    options = _trt_options(gpu_onnxruntime[-1])
    assert options["trt_profile_min_shapes"] == "encoder_hidden_states:2x77x32,sample:2x4x4x4,timestep:2"
    assert options["trt_profile_opt_shapes"] == "encoder_hidden_states:2x77x32,sample:2x4x8x8,timestep:2"
    assert options["trt_profile_max_shapes"] == "encoder_hidden_states:2x154x32,sample:2x4x16x16,timestep:2"


def test_ort_older_than_1_27_is_refused_beside_tensorrt_11() -> None:
    from difftool.exporters.onnxruntime_denoiser import check_tensorrt_provider

    check_tensorrt_provider("1.22.0", "10.9.0")
    check_tensorrt_provider("1.27.0", "11.0.1")
    check_tensorrt_provider("1.26.1", None)  # no TensorRT installed: ORT's own error says so
    with pytest.raises(BackendUnavailableError, match=r"onnxruntime 1\.26\.1's TensorRT provider cannot use "
                       r"TensorRT 11\.0\.1.*onnxruntime-gpu>=1\.27"):  # fmt: skip
        check_tensorrt_provider("1.26.1", "11.0.1")


def test_ort_session_refuses_old_onnxruntime_with_tensorrt_11(cache: Path, gpu_onnxruntime, monkeypatch) -> None:
    import onnxruntime

    from difftool.exporters import onnxruntime_denoiser
    from difftool.exporters.onnxruntime_denoiser import make_session

    entry = ArtifactCache().get_or_build("onnx", "unet-cccc-fp32", {"weights": "c"}, lambda f: _conv_export(f, 1.0))
    monkeypatch.setattr(onnxruntime, "__version__", "1.24.0")
    monkeypatch.setattr(onnxruntime_denoiser, "_installed_tensorrt", lambda: "11.2.0")
    with pytest.raises(BackendUnavailableError, match="cannot use TensorRT 11.2.0"):
        make_session(entry.file("model.onnx"), "cuda", provider="tensorrt")
    assert gpu_onnxruntime == []  # refused before any session
    make_session(entry.file("model.onnx"), "cuda", provider="cuda")  # the CUDA provider is unaffected
