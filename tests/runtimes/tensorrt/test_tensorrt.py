"""TensorRT: profile logic everywhere; engine build and parity only on a CUDA machine with TensorRT."""

import importlib.util
from pathlib import Path

import pytest

from difftool.core.errors import BackendUnavailableError, ParameterError
from difftool.runtimes.tensorrt.engine import unavailable_reason
from difftool.runtimes.tensorrt.profiles import Profile, select_profile, unet_profile


def test_unet_profile_rounds_to_the_unet_multiple() -> None:
    profile = unet_profile(6, 4, (1, 1, 2), (66, 512, 1030), class_labels=True)
    low, opt, high = profile.shapes["sample"]
    assert low == (1, 6, 64, 64) and opt == (1, 6, 512, 512) and high == (2, 6, 1028, 1028)
    assert profile.shapes["class_labels"] == ((1,), (1,), (2,))


def test_select_profile_picks_the_first_that_covers() -> None:
    small = unet_profile(6, 4, (1, 1, 1), (64, 256, 256), class_labels=False)
    large = unet_profile(6, 4, (1, 2, 2), (256, 512, 1024), class_labels=False)
    request = {"sample": (1, 6, 128, 200), "timestep": (1,)}
    assert select_profile([small, large], request) == 0
    assert select_profile([small, large], {"sample": (2, 6, 512, 600), "timestep": (2,)}) == 1


def test_no_profile_covers_the_shape_says_what_was_built() -> None:
    profile = unet_profile(6, 4, (1, 1, 1), (64, 256, 256), class_labels=False)
    with pytest.raises(ParameterError, match=r"no TensorRT profile covers sample \[1, 6, 512, 512\].*--tile"):
        select_profile([profile], {"sample": (1, 6, 512, 512), "timestep": (1,)})
    with pytest.raises(ParameterError):
        select_profile([profile], {"sample": (1, 7, 128, 128), "timestep": (1,)})  # wrong channels
    assert not Profile({"sample": profile.shapes["sample"]}).covers({"sample": (1, 6, 64, 64), "extra": (1,)})


def test_backend_reports_why_it_cannot_run_here() -> None:
    assert "--device cuda" in unavailable_reason("cpu")
    from difftool.plugins.registry import build_registry

    registry = build_registry(entry_points=False)
    assert "tensorrt" in registry.backends
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        registry.backend("tensorrt").resolve("cpu")


def _gpu_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch missing"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (CI and this workstation have none)"
    if importlib.util.find_spec("tensorrt") is None:
        return "needs the tensorrt package"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=_gpu_reason() or "")
def test_engine_matches_pytorch_on_the_gpu(superres_model: Path, photo: Path, registry) -> None:
    import numpy as np

    from difftool.app import api
    from difftool.training.evaluate import psnr

    kwargs = {"model": str(superres_model), "scale": "2", "seed": 1, "registry": registry, "device": "cuda"}
    reference = api.run("superres", photo, dtype="fp32", **kwargs)
    engine = api.run("superres", photo, backend="tensorrt", dtype="fp16", **kwargs)
    assert psnr(np.asarray(reference.image), np.asarray(engine.image)) > 35.0


def test_sd_profiles_and_graph_inputs_cover_every_input_of_the_export() -> None:
    """Pure logic, tested everywhere: the SDXL profile names each ONNX input; the feed matches it."""
    import torch

    from difftool.exporters.onnx import UNetSignature, graph_inputs
    from difftool.runtimes.tensorrt.profiles import signature_profile

    signature = UNetSignature(4, 4, False, 4, context_dim=2048, text_embeds_dim=1280, time_ids=6)
    profile = signature_profile(signature, (1, 2, 4), (8, 128, 160))
    assert set(profile.shapes) == set(signature.input_names())
    assert profile.shapes["encoder_hidden_states"][1] == (2, 77, 2048)
    assert profile.shapes["time_ids"][2] == (4, 6)
    cond = {
        "encoder_hidden_states": torch.zeros(2, 77, 2048),
        "added_cond_kwargs": {"text_embeds": torch.zeros(2, 1280), "time_ids": torch.zeros(2, 6)},
    }
    inputs = graph_inputs(signature, torch.zeros(2, 4, 128, 96), torch.tensor(999), cond, "cpu")
    assert list(inputs) == signature.input_names()
    assert inputs["timestep"].shape == (2,) and float(inputs["timestep"][1]) == 999
    assert select_profile([profile], {k: tuple(v.shape) for k, v in inputs.items()}) == 0
    inpaint = UNetSignature(9, 4, False, 4, context_dim=768)
    feed = graph_inputs(inpaint, torch.zeros(2, 4, 64, 64), torch.tensor(1), {
        "concat": torch.zeros(2, 5, 64, 64), "encoder_hidden_states": torch.zeros(2, 77, 768)}, "cpu")  # fmt: skip
    assert feed["sample"].shape == (2, 9, 64, 64)
    with pytest.raises(ParameterError, match="no TensorRT profile covers"):
        select_profile([signature_profile(inpaint, (1, 2, 2), (8, 64, 96))], {"sample": (2, 9, 128, 128)})


def test_export_tensorrt_without_a_gpu_says_why(tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from difftool import cli

    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(cli.cli, ["export", "tensorrt", "--device", "cpu"])
    assert result.exit_code == 1 and "cannot export tensorrt here" in result.output
    assert "--device cuda" in result.output and not (tmp_path / "cache").exists()


# --- build options, cache key, refit and progress: pure logic, tested everywhere ----------------------


def test_precision_flags_follow_the_gpu() -> None:
    from difftool.runtimes.tensorrt.engine import precision_flags

    assert precision_flags("fp32", (7, 5)) == [] and precision_flags("fp16", (7, 5)) == ["FP16"]
    assert precision_flags("bf16", (8, 6)) == ["BF16"]
    with pytest.raises(ParameterError, match=r"compute capability 7\.5\) has no bf16.*needs 8\.0"):
        precision_flags("bf16", (7, 5))
    with pytest.raises(ParameterError, match="fp8 needs a quantized"):
        precision_flags("fp8", (9, 0))


def test_workspace_limit_leaves_room_and_refuses_more_than_is_free() -> None:
    from difftool.runtimes.tensorrt.engine import GIB, workspace_limit

    assert workspace_limit(12 * GIB) == int(12 * GIB * 0.6)  # a 12 GB card: 7.2 GiB for tactics
    assert workspace_limit(100 << 20) == 256 << 20  # a floor, so tiny budgets still build something
    assert workspace_limit(12 * GIB, 2) == 2 * GIB
    with pytest.raises(ParameterError, match="workspace_gb=20 asks for more than the 12.0 GiB free"):
        workspace_limit(12 * GIB, 20)


def test_engine_key_refittable_ignores_weights_but_not_the_rest(tmp_path: Path) -> None:
    from difftool.exporters.cache import Entry, cache_key
    from difftool.runtimes.tensorrt.engine import BuildOptions, engine_components, needs_refit, timing_cache_path

    profile = unet_profile(6, 4, (1, 1, 1), (64, 256, 256), class_labels=False)
    a, b = Entry(tmp_path, {"key": "weights-a", "name": "x"}), Entry(tmp_path, {"key": "weights-b", "name": "x"})

    def key(onnx: Entry, options: BuildOptions, **changes: object) -> str:
        args = {"structure": "s1", "profiles": [profile], "tensorrt_version": "10.3", "capability": (8, 9)} | changes
        return cache_key(engine_components(onnx, options=options, **args))  # type: ignore[arg-type]

    refit, fixed = BuildOptions("fp16", refittable=True), BuildOptions("fp16")
    assert key(a, refit) == key(b, refit)  # new weights (a LoRA): same engine, refitted
    assert key(a, fixed) != key(b, fixed)
    base = key(a, refit)
    assert key(a, refit, structure="s2") != base
    assert key(a, BuildOptions("bf16", refittable=True)) != base
    assert key(a, refit, tensorrt_version="10.4") != base and key(a, refit, capability=(9, 0)) != base
    assert key(a, refit, profiles=[unet_profile(6, 4, (1, 1, 1), (64, 256, 512), False)]) != base
    engine = Entry(tmp_path, {"components": {"refittable": True}, "weights": "weights-a"})
    assert not needs_refit(engine, a) and needs_refit(engine, b)
    assert not needs_refit(Entry(tmp_path, {"components": {"refittable": False}, "weights": "weights-a"}), b)
    assert timing_cache_path(tmp_path, "10.3", (8, 9)) == tmp_path / "tensorrt" / "timing-10.3-sm89.cache"
    # TensorRT rejects a timing cache from another GPU model of the same architecture: keyed by it too
    assert timing_cache_path(tmp_path, "10.3", (8, 6), "RTX A2000 12288 MiB") != timing_cache_path(
        tmp_path, "10.3", (8, 6), "RTX 3090 24576 MiB"
    )
    assert key(a, refit, gpu="RTX A2000 12288 MiB") != key(a, refit, gpu="RTX 3090 24576 MiB")


def test_build_progress_bars_and_cancel() -> None:
    import io

    from difftool.runtimes.tensorrt.engine import BuildProgress

    out, stop = io.StringIO(), {"now": False}
    progress = BuildProgress(file=out, cancelled=lambda: stop["now"])
    progress.phase_start("Building engine", None, 4)
    progress.phase_start("Tactic timing", "Building engine", 100)
    assert progress.step_complete("Tactic timing", 0)  # nested: shown as the bar's postfix
    assert progress.step_complete("Building engine", 1)
    assert progress.bars["Building engine"].n == 2
    stop["now"] = True
    assert progress.step_complete("Building engine", 2) is False  # asks TensorRT to cancel
    progress.phase_finish("Tactic timing")
    progress.phase_finish("Building engine")
    assert not progress.bars and "TensorRT Building engine" in out.getvalue()


def test_static_profiles_use_cuda_graphs() -> None:
    from difftool.runtimes.tensorrt.profiles import is_static

    static = unet_profile(6, 4, (2, 2, 2), (512, 512, 512), class_labels=False)
    dynamic = unet_profile(6, 4, (1, 1, 2), (64, 512, 1024), class_labels=False)
    assert is_static([static]) and not is_static([static, dynamic])


def test_export_tensorrt_refuses_fp8_before_any_work(tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from difftool import cli

    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(cli.cli, ["export", "tensorrt", "--precision", "fp8"])
    assert result.exit_code == 1 and "fp8 needs a quantized" in result.output
    assert not (tmp_path / "cache").exists()


def _tiny_sd_unet(seed: int):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins" / "builtin"))
    from sd import tiny

    return tiny.components(seed=seed)["unet"]


def _sd_call(denoiser, unet, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 32, 48, generator=g)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        expected = unet.float()(sample, torch.tensor([500.0, 500.0]), encoder_hidden_states=context).sample
    actual = denoiser(sample.cuda(), torch.tensor(500.0), {"encoder_hidden_states": context.cuda()}).float().cpu()
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=_gpu_reason() or "")
def test_refittable_engine_takes_new_weights_without_a_rebuild(tmp_path: Path, monkeypatch) -> None:

    from difftool.plugins.builtin.backends import TensorRTBackend

    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path))
    first, second = _tiny_sd_unet(1), _tiny_sd_unet(2)  # same architecture, other weights (a LoRA, say)
    backend = TensorRTBackend().resolve("cuda", "fp32", {"cuda_graphs": "off"})
    a = backend.make_denoiser(first, prediction_type="epsilon", model_id="a" * 64)
    assert _sd_call(a, first) < 1e-2
    b = backend.make_denoiser(second, prediction_type="epsilon", model_id="b" * 64)
    assert "+" in b.fingerprint  # refitted
    assert len([p for p in (tmp_path / "tensorrt").iterdir() if p.is_dir()]) == 1  # one engine, built once
    assert _sd_call(b, second) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=_gpu_reason() or "")
def test_cuda_graph_replay_matches_direct_execution(tmp_path: Path, monkeypatch) -> None:

    from difftool.plugins.builtin.backends import TensorRTBackend

    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path))
    unet = _tiny_sd_unet(3)
    runs = {}
    for flag in ("off", "on"):
        backend = TensorRTBackend().resolve("cuda", "fp32", {"cuda_graphs": flag})
        denoiser = backend.make_denoiser(unet, prediction_type="epsilon", model_id="c" * 64)
        assert denoiser.use_graphs == (flag == "on")
        runs[flag] = [_sd_call(denoiser, unet, seed) for seed in (0, 1, 0)]  # replays with new inputs
    assert runs["off"] == pytest.approx(runs["on"], abs=1e-6)


def _ort_cuda_reason() -> str | None:
    try:
        import onnxruntime
        import torch
    except ImportError:
        return "needs torch and onnxruntime"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (CI and this workstation have none)"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "needs onnxruntime-gpu (pip install 'difftool[onnx-gpu]')"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_ort_cuda_reason() is not None, reason=_ort_cuda_reason() or "")
def test_onnx_runtime_cuda_binds_gpu_tensors(tmp_path: Path, monkeypatch) -> None:
    import torch

    from difftool.plugins.builtin.backends import OnnxBackend

    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path))
    unet = _tiny_sd_unet(4)
    for dtype, tolerance in ((torch.float32, 1e-3), (torch.float16, 2e-2)):
        backend = OnnxBackend().resolve("cuda", {torch.float32: "fp32", torch.float16: "fp16"}[dtype])
        denoiser = backend.make_denoiser(unet, prediction_type="epsilon", model_id="d" * 64)
        assert denoiser.device.type == "cuda"
        assert _sd_call(denoiser, unet) < tolerance
