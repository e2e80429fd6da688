"""``difftool export triton``: a model repository whose config parses as Triton's ModelConfig."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] not installed")

from google.protobuf import text_format  # noqa: E402

from difftool import cli  # noqa: E402
from difftool.plugins.builtin.pixel_model import load_pixel_model  # noqa: E402


def test_export_triton_writes_a_valid_repository(superres_model: Path, tmp_path: Path, monkeypatch) -> None:
    import onnxruntime as ort

    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "repo"
    result = CliRunner().invoke(
        cli.cli, ["export", "triton", "superres", "-o", str(repo), "--model", str(superres_model), "--instances", "2"]
    )
    assert result.exit_code == 0, result.output
    folder = repo / "difftool_superres"
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "difftool_superres" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8 and config.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in config.input] == [("sample", [6, -1, -1]), ("timestep", [1])]
    assert list(config.input[1].reshape.shape) == []  # each request's timestep is a scalar
    assert list(config.output[0].dims) == [3, -1, -1]
    assert (
        config.instance_group[0].count == 2
        and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    )
    cached = next((tmp_path / "cache").rglob("model.onnx"))
    assert (folder / "1" / "model.onnx").read_bytes() == cached.read_bytes()
    assert not list(repo.glob(".*"))  # no temp folders left

    # What Triton's batcher sends (two requests stacked, each with its own timestep) equals two PyTorch calls.
    unet = load_pixel_model(superres_model, "superres").unet.float().eval()
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    sample = torch.randn(2, 6, 16, 24, generator=torch.Generator().manual_seed(0))
    steps = torch.tensor([10.0, 700.0])
    out = session.run(None, {"sample": sample.numpy(), "timestep": steps.numpy()})[0]
    with torch.no_grad():
        expected = [unet(sample[i : i + 1], steps[i]).sample for i in range(2)]
    assert np.abs(out - torch.cat(expected).numpy()).max() < 1e-4


def test_class_conditioned_models_get_an_int64_label_input() -> None:
    from difftool.exporters.onnx import UNetSignature
    from difftool.exporters.triton import TritonOptions, config_text

    text = config_text("m", UNetSignature(6, 4, True, 3), TritonOptions(max_batch_size=4, kind="KIND_GPU"))
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    labels = config.input[2]
    assert labels.name == "class_labels" and labels.data_type == model_config_pb2.TYPE_INT64
    assert config.max_batch_size == 4 and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
