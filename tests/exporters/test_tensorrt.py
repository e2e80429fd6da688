"""TensorRT: profile logic everywhere; engine build and parity only on a CUDA machine with TensorRT."""

import importlib.util
from pathlib import Path

import pytest

from difftool.core.errors import BackendUnavailableError, ParameterError
from difftool.exporters.tensorrt import Profile, select_profile, unavailable_reason, unet_profile


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
        registry.backend("tensorrt", "cpu")


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

    from difftool import api
    from difftool.training.evaluate import psnr

    kwargs = {"model": str(superres_model), "scale": "2", "seed": 1, "registry": registry, "device": "cuda"}
    reference = api.run("superres", photo, dtype="fp32", **kwargs)
    engine = api.run("superres", photo, backend="tensorrt", dtype="fp16", **kwargs)
    assert psnr(np.asarray(reference.image), np.asarray(engine.image)) > 35.0


def test_sd_profiles_and_graph_inputs_cover_every_input_of_the_export() -> None:
    """Pure logic, tested everywhere: the SDXL profile names each ONNX input; the feed matches it."""
    import torch

    from difftool.exporters.onnx import UNetSignature, graph_inputs
    from difftool.exporters.tensorrt import signature_profile

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
    assert result.exit_code == 1 and "cannot build a TensorRT engine here" in result.output
    assert "--device cuda" in result.output and not (tmp_path / "cache").exists()
