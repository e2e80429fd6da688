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
import torch

from difftool.core.errors import BackendUnavailableError
from difftool.exporters.cache import ArtifactCache

pytest.importorskip("onnxruntime")


def _tiny_sd_unet(seed: int) -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins" / "builtin"))
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
    from difftool.runtimes.onnxruntime.denoiser import make_session

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
    from difftool.runtimes.onnxruntime.denoiser import check_tensorrt_provider

    check_tensorrt_provider("1.22.0", "10.9.0")
    check_tensorrt_provider("1.27.0", "11.0.1")
    check_tensorrt_provider("1.26.1", None)  # no TensorRT installed: ORT's own error says so
    with pytest.raises(BackendUnavailableError, match=r"onnxruntime 1\.26\.1's TensorRT provider cannot use "
                       r"TensorRT 11\.0\.1.*onnxruntime-gpu>=1\.27"):  # fmt: skip
        check_tensorrt_provider("1.26.1", "11.0.1")


def test_ort_session_refuses_old_onnxruntime_with_tensorrt_11(cache: Path, gpu_onnxruntime, monkeypatch) -> None:
    import onnxruntime

    from difftool.runtimes.onnxruntime import denoiser as onnxruntime_denoiser
    from difftool.runtimes.onnxruntime.denoiser import make_session
    from difftool.testing.gpu import gpu_harness

    entry = ArtifactCache().get_or_build("onnx", "unet-cccc-fp32", {"weights": "c"}, lambda f: _conv_export(f, 1.0))
    monkeypatch.setattr(onnxruntime, "__version__", "1.24.0")
    monkeypatch.setattr(onnxruntime_denoiser, "_installed_tensorrt", lambda: "11.2.0")
    with pytest.raises(BackendUnavailableError, match="cannot use TensorRT 11.2.0"):
        make_session(entry.file("model.onnx"), "cuda", provider="tensorrt")
    assert gpu_onnxruntime == []  # refused before any session
    with gpu_harness():  # the CUDA provider is unaffected (it gets a stream of ours: a CUDA runtime call)
        make_session(entry.file("model.onnx"), "cuda", provider="cuda")


# --- a toy U-Net graph and its engine, for the engine contract tests -----------------------------------


def _toy_unet(
    folder: Path, *, out: str = "out", out_channels: int = 3, extra_input: bool = False, weight: float = 0.5
) -> dict[str, Any]:
    """``out = conv1x1(sample) (+ extra)``; ``timestep`` is an input no node reads (TensorRT drops it)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    kernel = np.full((out_channels, 3, 1, 1), weight, np.float32)
    kernel[:, 0, 0, 0] += np.arange(out_channels, dtype=np.float32)  # channels differ: a swapped output shows
    nodes = [helper.make_node("Conv", ["sample", "conv.weight"], ["conv_out" if extra_input else out])]
    inputs = [
        helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["b", 3, "h", "w"]),
        helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["b"]),
    ]
    if extra_input:  # an input difftool does not give (static, so the engine still builds)
        inputs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1, out_channels, 4, 4]))
        nodes.append(helper.make_node("Add", ["conv_out", "extra"], [out]))
    graph = helper.make_graph(
        nodes,
        "toy",
        inputs,
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["b", out_channels, "h", "w"])],
        [numpy_helper.from_array(kernel, "conv.weight")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder / "model.onnx")
    return {}


TOY_PROFILE = {"sample": ((1, 3, 4, 4), (1, 3, 8, 8), (2, 3, 16, 16)), "timestep": ((1,), (1,), (2,))}


def _toy_engine(tag: str, **graph: Any) -> tuple[Any, Any, Any]:
    """The toy graph's ONNX entry, engine entry and profile (call it inside ``gpu_harness``)."""
    from difftool.runtimes.tensorrt.engine import BuildOptions, cached_engine
    from difftool.runtimes.tensorrt.profiles import Profile

    onnx = ArtifactCache().get_or_build("onnx", f"toy-{tag}", {"weights": tag, **graph},
                                        lambda f: _toy_unet(f, **graph))  # fmt: skip
    profile = Profile(TOY_PROFILE)
    return onnx, cached_engine(onnx, [profile], BuildOptions("fp32"), "cuda"), profile


def _toy_denoiser(tag: str, **graph: Any) -> Any:
    """A TensorRTDenoiser on the toy graph's engine (call it inside ``gpu_harness``)."""
    from difftool.exporters.onnx import UNetSignature
    from difftool.runtimes.tensorrt.denoiser import TensorRTDenoiser

    onnx, engine, profile = _toy_engine(tag, **graph)
    signature = UNetSignature(in_channels=3, multiple=1, class_labels=False)
    return TensorRTDenoiser(engine, [profile], signature=signature, sample_channels=3, prediction_type="epsilon",
                            device="cuda", onnx=onnx, cuda_graphs="off")  # fmt: skip


def _toy_expected(sample: torch.Tensor, weight: float = 0.5) -> torch.Tensor:
    kernel = torch.full((3, 3, 1, 1), weight)
    kernel[:, 0, 0, 0] += torch.arange(3, dtype=torch.float32)
    return torch.nn.functional.conv2d(sample, kernel)


# --- 5. the engine's own I/O tensors, checked at load; the output's shape checked after binding --------


def test_an_invalid_profile_is_refused_when_tensorrt_returns_minus_one(tmp_path: Path) -> None:
    from difftool.runtimes.tensorrt.engine import BuildOptions, build_engine
    from difftool.runtimes.tensorrt.profiles import Profile
    from difftool.testing.gpu import gpu_harness

    _toy_unet(tmp_path)
    backwards = Profile({**TOY_PROFILE, "sample": ((1, 3, 16, 16), (1, 3, 8, 8), (2, 3, 4, 4))})  # min > max
    with gpu_harness() as harness:
        with pytest.raises(
            BackendUnavailableError, match=r"refused the optimization profile .*sample \[1, 3, 16, 16\]"
        ):
            build_engine(tmp_path / "model.onnx", tmp_path / "model.engine", [backwards], BuildOptions("fp32"))
    assert harness.trt.builds == 0 and not (tmp_path / "model.engine").exists()


def test_inputs_tensorrt_dropped_are_not_bound_and_any_output_name_is(cache: Path) -> None:
    """TensorRT drops inputs no layer reads (here: timestep) and the output need not be called "out"."""
    from difftool.testing.gpu import gpu_harness

    sample = torch.randn(2, 3, 8, 12)
    with gpu_harness() as harness:
        denoiser = _toy_denoiser("renamed", out="noise_pred")
        assert set(denoiser.io.inputs) == {"sample"} and set(denoiser.io.outputs) == {"noise_pred"}
        result = denoiser(sample, torch.tensor(500.0), {})
    assert harness.trt.executed[-1] == (("sample",), ("noise_pred",))
    torch.testing.assert_close(result, _toy_expected(sample), rtol=1e-5, atol=1e-5)


def test_an_engine_wanting_an_input_difftool_does_not_give_is_refused_at_load(cache: Path) -> None:
    from difftool.testing.gpu import gpu_harness

    with gpu_harness(), pytest.raises(BackendUnavailableError, match="takes extra, which difftool does not give it"):
        _toy_denoiser("extra", extra_input=True)


def test_an_output_shape_other_than_the_buffer_is_refused_before_tensorrt_writes(cache: Path) -> None:
    from difftool.testing.gpu import gpu_harness

    with gpu_harness() as harness:
        denoiser = _toy_denoiser("two-channels", out_channels=2)  # the buffer is sized for 3 channels
        with pytest.raises(BackendUnavailableError, match=r"would write out as \[1, 2, 8, 8\], not \[1, 3, 8, 8\]"):
            denoiser(torch.randn(1, 3, 8, 8), torch.tensor(1.0), {})
    assert harness.trt.executions == 0


# --- 8. tensor addresses 256-byte aligned --------------------------------------------------------------


def test_misaligned_tensors_are_copied_not_refused(cache: Path) -> None:
    """setTensorAddress refuses (returns False for) addresses off 256 bytes: a view at an offset is one."""
    from difftool.testing.gpu import gpu_harness

    base = torch.randn(2 * 3 * 8 * 8 + 1)
    sample = base[1:].view(2, 3, 8, 8)  # contiguous, 4 bytes past an allocation
    assert sample.is_contiguous() and sample.data_ptr() % 256 != 0
    with gpu_harness() as harness:
        denoiser = _toy_denoiser("aligned")
        assert denoiser.context.set_tensor_address("sample", sample.data_ptr()) is False  # what TensorRT does
        assert denoiser.context.set_tensor_address("nope", 0x1000) is False
        assert denoiser.context.set_tensor_address("sample", 0) is False
        refused = len(harness.trt.refused_addresses)
        result = denoiser(sample, torch.tensor(3.0), {})
    assert len(harness.trt.refused_addresses) == refused == 3  # difftool's own bindings all accepted
    torch.testing.assert_close(result, _toy_expected(sample), rtol=1e-5, atol=1e-5)


# --- 7. concurrent builds merge their timing caches ----------------------------------------------------


def test_a_build_finishing_meanwhile_keeps_its_timing_cache_entries(cache: Path) -> None:
    """Each build read the timing cache before and rewrote it after: the one finishing last erased the
    other's tactic timings. Now each merges into the file under a lock (ITimingCache.combine)."""
    import json

    from difftool.runtimes.tensorrt.engine import gpu_identity, timing_cache_path
    from difftool.testing.gpu import gpu_harness

    with gpu_harness() as harness:
        # another process's build (a graph with an Add as well) finishes while this one times its tactics
        harness.trt.during_build.append(lambda: _toy_engine("meanwhile", extra_input=True))
        _toy_engine("first")
        path = timing_cache_path(cache, harness.trt.version, (8, 9), gpu_identity("cuda:0"))
        entries = json.loads(path.read_bytes()[len(b"FAKETC1:") :])["entries"]
    assert harness.trt.builds == 2
    assert sorted(entry.partition("|")[0] for entry in entries) == ["Add", "Conv"]  # neither build's lost


# --- 3. engines keeping their build weights: REFIT_IDENTICAL + STRIP_PLAN; refit=auto off on 11.3+ ------


def test_engines_keep_their_weights_stripped_and_refit_identically_from_their_export(cache: Path) -> None:
    from difftool.runtimes.tensorrt.engine import ENGINE_FILE, load_engine, refit
    from difftool.testing.gpu import gpu_harness

    sample = torch.randn(1, 3, 8, 8)
    with gpu_harness() as harness:
        denoiser = _toy_denoiser("kept")
        assert harness.trt.build_flags == [["REFIT_IDENTICAL", "STRIP_PLAN"]]
        assert harness.trt.refits == 1  # the plan holds no weights: refitted from its own export at load
        torch.testing.assert_close(denoiser(sample, torch.tensor(1.0), {}), _toy_expected(sample))
        assert "+" not in denoiser.fingerprint  # its own weights: no other export named
        onnx, engine, _ = _toy_engine("kept")
        assert engine.manifest["stripped"] is True
        with pytest.raises(BackendUnavailableError, match="holds no weights and its ONNX export is not at hand"):
            load_engine(engine, "cuda")
        # REFIT_IDENTICAL promises the build's weights: another export's are refused (undefined in TensorRT)
        other, _, _ = _toy_engine("other", weight=2.0)
        import tensorrt as trt

        loaded = trt.Runtime(trt.Logger()).deserialize_cuda_engine(engine.file(ENGINE_FILE).read_bytes())
        with pytest.raises(BackendUnavailableError, match="weights differ from the build's"):
            refit(loaded, other.file("model.onnx"))


def test_refit_auto_is_off_on_tensorrt_11_3_where_refittable_engines_drop_a_bias(caplog) -> None:
    """TensorRT 11.3 documents that a REFIT engine may drop a GEMM bias, refitted or not; the stand-in
    does so. refit=auto builds REFIT_IDENTICAL there (right output) and REFIT before 11.3 (LoRAs refit)."""
    from difftool.plugins.builtin.backends import TensorRTBackend
    from difftool.testing.gpu import gpu_harness

    unet = _tiny_sd_unet(4)
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        expected = unet.float()(sample, torch.tensor([500.0, 500.0]), encoder_hidden_states=context).sample

    def error(version: str, refit: str) -> tuple[float, list[str]]:
        with gpu_harness(version) as harness:
            backend = TensorRTBackend().resolve("cuda", "fp32", {"refit": refit, "cuda_graphs": "off"})
            denoiser = backend.make_denoiser(unet, prediction_type="epsilon", model_id="f" * 64)
            actual = denoiser(sample, torch.tensor(500.0), {"encoder_hidden_states": context})
        return float((actual - expected).abs().max() / expected.abs().max()), harness.trt.build_flags[-1]

    right, flags = error("11.3.0", "auto")
    assert flags == ["REFIT_IDENTICAL", "STRIP_PLAN"] and right < 1e-4
    right, flags = error("10.16.0", "auto")
    assert flags == ["REFIT"] and right < 1e-4
    assert "may drop a GEMM bias" not in caplog.text
    wrong, flags = error("11.3.0", "on")  # asked for explicitly: built, with a warning, and visibly off
    assert flags == ["REFIT"] and wrong > 1e-3 and "may drop a GEMM bias" in caplog.text


# --- 9. TensorRT 10 builds the fp16 export strongly typed: its fp32 layers stay fp32 ---------------------


def _timestep_probe(folder: Path) -> dict[str, Any]:
    """``out = sample * sin(0.7331 * timestep)``: the sinusoidal embedding the fp16 export keeps in fp32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Mul", ["timestep", "frequency"], ["phase"]),
        helper.make_node("Sin", ["phase"], ["embedding"]),
        helper.make_node("Reshape", ["embedding", "per_sample"], ["scale"]),
        helper.make_node("Mul", ["sample", "scale"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "probe",
        [
            helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["b", 3, "h", "w"]),
            helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["b"]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 3, "h", "w"])],
        [
            numpy_helper.from_array(np.array(0.7331, np.float32), "frequency"),
            numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "per_sample"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder / "model.onnx")
    return {}


def test_a_weakly_typed_fp16_engine_may_run_the_timestep_embedding_in_fp16(cache: Path) -> None:
    """TensorRT 10's FP16 flag without precision constraints lets any layer run in fp16; the stand-in rounds
    every tensor to fp16, so sin(0.7331 t) at t = 999 (fp16 spacing 0.5 there) is visibly off; the same
    graph strongly typed computes in its own fp32."""
    from difftool.exporters.onnx import UNetSignature
    from difftool.runtimes.tensorrt.denoiser import TensorRTDenoiser
    from difftool.runtimes.tensorrt.engine import BuildOptions, cached_engine
    from difftool.runtimes.tensorrt.profiles import Profile
    from difftool.testing.gpu import gpu_harness

    sample, timestep = torch.ones(2, 3, 4, 4), torch.tensor([999.0, 733.0])
    expected = torch.sin(0.7331 * timestep.double()).float().reshape(-1, 1, 1, 1).expand(2, 3, 4, 4)
    signature = UNetSignature(in_channels=3, multiple=1, class_labels=False)

    def run(graph: str) -> tuple[float, bool, list[str]]:
        """An fp16 engine of the probe exported as ``graph`` (the export's precision decides the typing)."""
        onnx = ArtifactCache().get_or_build("onnx", "probe", {"precision": graph}, _timestep_probe)
        with gpu_harness("10.16.0") as harness:
            engine = cached_engine(onnx, [Profile(TOY_PROFILE)], BuildOptions("fp16"), "cuda")
            denoiser = TensorRTDenoiser(
                engine, [Profile(TOY_PROFILE)], signature=signature, sample_channels=3,
                prediction_type="epsilon", device="cuda", onnx=onnx, cuda_graphs="off",
            )  # fmt: skip
            error = float((denoiser(sample, timestep, {}) - expected).abs().max())
        return error, harness.trt.build_typed[-1], harness.trt.warnings

    weak, typed, warnings = run("fp32")  # what every TensorRT 10 fp16 build was: the fp32 export + FP16
    assert not typed and weak > 0.05
    assert warnings == ["weakly typed networks (BuilderFlag.FP16/BF16) are deprecated"]  # from 10.12
    strong, typed, warnings = run("fp16")  # (the probe's fp32 Sin stands for the fp16 export's pinned layers)
    assert typed and strong < 1e-4 and not warnings  # fp32 spacing at 732 is 6e-5


def test_tensorrt_10_builds_the_fp16_export_strongly_typed(photo: Path, superres_model: Path, cache: Path) -> None:
    """The fp16 engine is the fp16 export (timestep embedding and norms pinned to fp32), strongly typed, on
    TensorRT 10 as on 11; bf16 (no bf16 export) is the one weakly typed build left, TensorRT 10 only."""
    from difftool.app import api
    from difftool.testing.gpu import gpu_harness

    common = {"model": str(superres_model), "scale": 2, "seed": 3, "backend": "tensorrt", "device": "cuda", "tile": 72}
    with gpu_harness("10.16.0") as harness:
        api.run("superres", photo, dtype="fp16", **common)
        assert harness.trt.build_typed == [True] and harness.trt.build_flags == [["REFIT_IDENTICAL", "STRIP_PLAN"]]
        assert [p.name for p in (cache / "onnx").iterdir() if "-fp16-" in p.name]
        assert not harness.trt.warnings
        api.run("superres", photo, dtype="bf16", **common)
        assert harness.trt.build_typed[-1] is False and "BF16" in harness.trt.build_flags[-1]


# --- 10. smaller: the default profile's bound, the text-length error, the ORT CUDA provider's options ---


def test_the_default_profile_takes_max_size_pixels_not_twice_as_many() -> None:
    """max_size=1024 means 1024 px: 128 latent cells for Stable Diffusion (it admitted 256: 2048 px)."""
    from difftool.exporters.onnx import UNetSignature
    from difftool.runtimes.tensorrt.profiles import control_ranges, engine_profile

    sd = UNetSignature(in_channels=4, multiple=4, class_labels=False, out_channels=4, context_dim=32)
    pixel = UNetSignature(in_channels=6, multiple=4, class_labels=False)
    for largest in (1024, 768, 2048):
        low, opt, high = engine_profile(sd, None, largest).shapes["sample"]
        assert high[2:] == (largest // 8, largest // 8) and low[2:] == (8, 8) and opt[2:] == (64, 64)
        assert engine_profile(pixel, None, largest).shapes["sample"][2][2:] == (largest, largest)
        assert control_ranges(None, largest)[1] == (8, 64, largest // 8)
    # below the 512 px opt the opt follows the max (min <= opt <= max, or TensorRT refuses the profile)
    assert engine_profile(sd, None, 256).shapes["sample"][1][2:] == (32, 32)
    assert engine_profile(pixel, None, 256).shapes["sample"][1][2:] == (256, 256)


def test_a_prompt_longer_than_the_engine_takes_says_shorten_the_prompt_not_tile() -> None:
    from difftool.core.errors import ParameterError
    from difftool.exporters.onnx import UNetSignature
    from difftool.runtimes.tensorrt.profiles import engine_profile, select_profile

    sd = UNetSignature(in_channels=4, multiple=4, class_labels=False, out_channels=4, context_dim=32)
    profile = engine_profile(sd, None, 1024)  # 77 tokens: one chunk
    request = {"sample": (2, 4, 64, 64), "timestep": (2,), "encoder_hidden_states": (2, 154, 32)}
    with pytest.raises(ParameterError) as caught:
        select_profile([profile], request)
    message = str(caught.value)
    assert "the prompt is 154 tokens and this TensorRT engine takes at most 77" in message
    assert "shorten the prompt (or its negative) to 1 chunk(s) of 75 tokens" in message
    assert "--tile" not in message and "max_size" not in message
    with pytest.raises(ParameterError, match=r"no TensorRT profile covers sample \[2, 4, 256, 256\].*--tile"):
        select_profile([profile], {**request, "sample": (2, 4, 256, 256), "encoder_hidden_states": (2, 77, 32)})


class _StreamLog:
    """A CUDA stream that logs the waits and host synchronisations asked of it."""

    def __init__(self, name: str, handle: int, log: list[str]) -> None:
        self.name, self.cuda_stream, self.log = name, handle, log

    def wait_stream(self, other: Any) -> None:
        self.log.append(f"{self.name} waits for {other.name}")

    def synchronize(self) -> None:
        self.log.append(f"host waits for {self.name}")


def test_the_ort_cuda_provider_runs_on_our_stream_without_host_syncs(cache: Path, gpu_onnxruntime, monkeypatch):
    """The CUDA provider gets cuDNN's heuristic search and a stream of ours as user_compute_stream (not 0,
    which ONNX Runtime reads as none); a step orders it against PyTorch's stream on the GPU and asks ONNX
    Runtime not to wait on the host: no host synchronisation at all (there were two per step)."""
    from difftool.runtimes.onnxruntime import denoiser as onnxruntime_denoiser
    from difftool.runtimes.onnxruntime.denoiser import NO_SYNC, make_session, run_bound
    from difftool.testing.gpu import gpu_harness

    log: list[str] = []
    entry = ArtifactCache().get_or_build("onnx", "unet-dddd-fp32", {"weights": "d"}, lambda f: _conv_export(f, 1.0))
    with gpu_harness() as harness:
        monkeypatch.setattr(harness.cuda, "new_stream", lambda device: _StreamLog("ours", 0x5000, log))
        monkeypatch.setattr(harness.cuda, "current_stream", lambda device: _StreamLog("torch", 0, log))
        session = make_session(entry.file("model.onnx"), "cuda:0", provider="cuda")
        name, options = gpu_onnxruntime[-1][0]
        assert name == "CUDAExecutionProvider" and options["user_compute_stream"] == str(0x5000)
        assert options["cudnn_conv_algo_search"] == "HEURISTIC"  # not EXHAUSTIVE on every new shape

        class Binding:
            def bind_input(self, *args: Any) -> None:
                pass

            bind_output = bind_input

        runs: list[Any] = []
        session.io_binding = Binding
        session.run_with_iobinding = lambda binding, options=None: (runs.append(options), log.append("run"))
        x = torch.zeros(1, 3, 4, 4)
        run_bound(session, {"sample": x}, {"out": torch.zeros_like(x)}, torch.device("cuda", 0))
    assert log == ["ours waits for torch", "run", "torch waits for ours"]  # ordered on the GPU only
    assert runs[0].get_run_config_entry(NO_SYNC) == "1"
    # The TensorRT provider runs on streams of its own: it keeps the host wait (and gets no stream of ours).
    trt = make_session(entry.file("model.onnx"), "cuda:0", provider="tensorrt")
    assert trt not in onnxruntime_denoiser._STREAMS
    assert "user_compute_stream" not in dict(gpu_onnxruntime[-1][1][1])
    assert gpu_onnxruntime[-1][1][1]["cudnn_conv_algo_search"] == "HEURISTIC"


# --- 4. LoRA combinations: one export (and engine) per checkpoint, not one per combination -------------


@pytest.mark.slow  # three tiny SD U-Net exports: about a minute, four on a loaded 2-core machine
def test_a_new_lora_combination_replaces_the_previous_lora_export_not_the_checkpoints(
    tmp_path: Path, cache: Path
) -> None:
    """Each LoRA combination is a whole U-Net export (3.4 GB for SD 1.5) and none was ever removed: the
    export (and non-refittable engine) of a new combination now replaces the previous combination's of
    the same checkpoint; the checkpoint's own export stays."""
    pytest.importorskip("peft")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins" / "builtin"))
    from sd import tiny
    from sd.test_lora import make_lora

    from difftool.exporters.onnx import LORA_BASE, UNetSignature, cached_export
    from difftool.plugins.builtin.sd.loader import load_sd_model
    from difftool.runtimes.tensorrt.engine import BuildOptions, cached_engine
    from difftool.runtimes.tensorrt.profiles import engine_profile
    from difftool.testing.gpu import gpu_harness

    parts = tiny.components(seed=5)
    folder = tiny.save_folder(parts, tmp_path / "sd")
    lora = make_lora(parts["unet"], tmp_path / "lora" / "style.safetensors")
    base, first, second = (load_sd_model(folder, loras=loras) for loras in ([], [(lora, 1.0)], [(lora, 0.5)]))
    assert getattr(first.unet, LORA_BASE) == base.sha256 and not hasattr(base.unet, LORA_BASE)

    def export(model: Any) -> Any:
        return cached_export(model.unet, name=f"unet-{model.unet_id[:12]}", model_id=model.unet_id)

    def engine(onnx: Any) -> Any:
        profile = engine_profile(UNetSignature.of(base.unet), None, 256)
        return cached_engine(onnx, [profile], BuildOptions("fp32"), "cuda")  # keeps its weights: keyed by them

    with gpu_harness("11.3.0"):
        own, one = export(base), export(first)
        own_engine, one_engine = engine(own), engine(one)
        two = export(second)
        two_engine = engine(two)
    assert two.path.name.startswith(f"unet-{base.sha256[:12]}-lora-fp32-")
    assert not one.path.exists() and not one_engine.path.exists()  # the previous combination's, gone
    assert own.path.is_dir() and own_engine.path.is_dir() and two_engine.path.is_dir()
    assert two.manifest["components"]["weights"] == second.unet_id  # still keyed by the combination


# --- Part A: stream ordering, as strict as a GPU's queue --------------------------------------------------


def test_engine_output_is_only_there_once_the_reading_stream_waits_for_the_engines(cache: Path, monkeypatch) -> None:
    """TensorRT's work runs later on its stream: a read not ordered after it sees an unwritten buffer."""
    from difftool.testing import gpu
    from difftool.testing.gpu import gpu_harness

    sample = torch.randn(1, 3, 8, 8)
    with gpu_harness() as harness:
        denoiser = _toy_denoiser("ordered")
        torch.testing.assert_close(denoiser(sample, torch.tensor(1.0), {}), _toy_expected(sample), rtol=1e-5, atol=1e-5)
        assert harness.trt.executions == 1 and not any(harness.cuda.pending.values())
        with monkeypatch.context() as patched:  # difftool without its `current.wait_stream(self.stream)`
            patched.setattr(gpu.FakeStream, "wait_stream", lambda self, other: None)
            other = sample + 1  # another input: a reused buffer holding the last output is no answer either
            unordered = denoiser(other, torch.tensor(1.0), {})
        assert harness.trt.executions == 1  # enqueued, not run: nothing waited for the stream
        assert not torch.allclose(unordered, _toy_expected(other), atol=1e-3)
        denoiser.stream.synchronize()
        assert harness.trt.executions == 2


def _graph_with(folder: Path, op: str, domain: str = "", opset: int = 18) -> Path:
    """``out = op(sample)``: a one-node graph of operator ``op`` from ``domain``."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node(op, ["sample"], ["out"], domain=domain)
    graph = helper.make_graph(
        [node],
        "one-op",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["b", 3, "h", "w"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n"])],
    )
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=imports), folder / "model.onnx")
    return folder / "model.onnx"


@pytest.mark.parametrize(
    ("op", "domain", "opset", "message"),
    [
        ("Unique", "", 18, "No importer registered for op: Unique"),
        ("Gelu", "com.microsoft", 18, r"No importer registered for op: Gelu \(com.microsoft\)"),
        ("Relu", "", 8, "unsupported ONNX opset 8"),
    ],
)
def test_an_operator_or_opset_tensorrt_has_no_importer_for_fails_the_parse(tmp_path, op, domain, opset, message):
    """ONNX Runtime runs contrib ops and old opsets; TensorRT's parser refuses them, and so does the stand-in."""
    from difftool.runtimes.tensorrt.engine import BuildOptions, build_engine
    from difftool.runtimes.tensorrt.profiles import Profile
    from difftool.testing.gpu import gpu_harness

    path = _graph_with(tmp_path, op, domain, opset)
    profile = Profile({"sample": ((1, 3, 4, 4), (1, 3, 8, 8), (2, 3, 16, 16))})
    with gpu_harness() as harness, pytest.raises(BackendUnavailableError, match=message) as raised:
        build_engine(path, tmp_path / "model.engine", [profile], BuildOptions("fp32"))
    assert "--backend onnx" in str(raised.value)
    assert harness.trt.builds == 0 and not (tmp_path / "model.engine").exists()
