"""``difftool export triton``: a model repository whose config parses as Triton's ModelConfig."""

from __future__ import annotations

import contextlib
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
from difftool.testing import BackendConformance  # noqa: E402


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
    from difftool.runtimes.triton.export import TritonOptions, config_text

    text = config_text("m", UNetSignature(6, 4, True, 3), TritonOptions(max_batch_size=4, kind="KIND_GPU"))
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    labels = config.input[2]
    assert labels.name == "class_labels" and labels.data_type == model_config_pb2.TYPE_INT64
    assert config.max_batch_size == 4 and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


class StubTriton:
    """A test-only stand-in for Triton's gRPC inference service over a Unix socket (no server can run here):
    it serves a repository written by `difftool export triton` by running each model.onnx in ONNX Runtime,
    honouring config.pbtxt's reshapes. Only the calls difftool's Triton backend makes are implemented."""

    def __init__(self, repo: Path) -> None:
        import onnxruntime as ort

        self.configs, self.sessions = {}, {}
        for folder in sorted(p for p in repo.iterdir() if (p / "config.pbtxt").is_file()):
            config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
            self.configs[config.name] = config
            self.sessions[config.name] = ort.InferenceSession(str(folder / "1" / "model.onnx"))

    def servicer(self):
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        stub = self

        class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
            def RepositoryIndex(self, request, context):
                models = [service_pb2.RepositoryIndexResponse.ModelIndex(name=n, state="READY") for n in stub.configs]
                return service_pb2.RepositoryIndexResponse(models=models)

            def ModelConfig(self, request, context):
                return service_pb2.ModelConfigResponse(config=stub.configs[request.name])

            def ModelReady(self, request, context):
                return service_pb2.ModelReadyResponse(ready=request.name in stub.configs)

            def ModelInfer(self, request, context):
                config = stub.configs[request.model_name]
                reshaped = {i.name: i.HasField("reshape") for i in config.input}
                feeds = {}
                for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
                    array = np.frombuffer(raw, np.int64 if tensor.datatype == "INT64" else np.float32)
                    array = array.reshape(list(tensor.shape))
                    feeds[tensor.name] = array.reshape(array.shape[0]) if reshaped[tensor.name] else array
                out = stub.sessions[request.model_name].run(None, feeds)[0].astype(np.float32)
                output = service_pb2.ModelInferResponse.InferOutputTensor(name="out", datatype="FP32", shape=out.shape)
                response = service_pb2.ModelInferResponse(model_name=request.model_name, outputs=[output])
                response.raw_output_contents.append(out.tobytes())
                return response

        return Servicer()


@pytest.fixture
def triton_repo(superres_model: Path, tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "repo"
    result = CliRunner().invoke(
        cli.cli, ["export", "triton", "superres", "-o", str(repo), "--model", str(superres_model)]
    )
    assert result.exit_code == 0, result.output
    return repo


def serve(repo: Path, socket_path: Path):
    from concurrent import futures

    import grpc
    from tritonclient.grpc import service_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(StubTriton(repo).servicer(), server)
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    return server


def test_the_triton_backend_runs_a_task_through_a_server(
    triton_repo: Path, superres_model: Path, photo: Path, tmp_path: Path, monkeypatch
) -> None:
    from difftool.app import api
    from difftool.training.evaluate import psnr

    server = serve(triton_repo, tmp_path / "triton.sock")
    try:
        monkeypatch.setenv("DIFFTOOL_TRITON_URL", f"unix:{tmp_path / 'triton.sock'}")
        common = dict(model=str(superres_model), scale="2", seed=3, dtype="fp32")
        reference = api.run("superres", photo, **common)
        served = api.run("superres", photo, backend="triton", **common)
        assert served.record["backend"] == "triton" and served.record["artifact"].endswith("/difftool_superres")
        a, b = (np.asarray(r.image, np.float32) / 255 for r in (reference, served))
        assert psnr(a, b) > 40
    finally:
        server.stop(0)


def test_the_triton_backend_refuses_a_model_from_other_weights(
    triton_repo: Path, superres_model: Path, photo: Path, tmp_path: Path, monkeypatch
) -> None:
    from difftool.app import api
    from difftool.core.errors import ModelError

    config = triton_repo / "difftool_superres" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "', 'string_value: "other'))
    server = serve(triton_repo, tmp_path / "triton.sock")
    try:
        monkeypatch.setenv("DIFFTOOL_TRITON_URL", f"unix:{tmp_path / 'triton.sock'}")
        with pytest.raises(ModelError, match="serves no model exported from these weights"):
            api.run("superres", photo, model=str(superres_model), scale="2", backend="triton")
    finally:
        server.stop(0)
    monkeypatch.delenv("DIFFTOOL_TRITON_URL")
    from difftool.plugins.registry import build_registry

    backend = build_registry(entry_points=False).backends["triton"].value
    assert backend.validate_options({})["url"] == "localhost:8001"  # the declared default, unless the variable is set
    monkeypatch.setenv("DIFFTOOL_TRITON_URL", "triton-host:8001")
    assert backend.validate_options({})["url"] == "triton-host:8001"


class TestTritonConformance(BackendConformance):
    """The backend conformance suite against the stub server (the repository exported from tiny_unet)."""

    def make_backend(self):
        from difftool.plugins.builtin.backends import TritonBackend

        return TritonBackend()

    _repo: Path | None = None

    @classmethod
    def repository(cls) -> Path:
        """The tiny module's repository, written once for the class (each export costs seconds)."""
        if cls._repo is None:
            import tempfile

            from difftool.exporters.onnx import UNetSignature, export
            from difftool.runtimes.triton.export import write_repository
            from difftool.testing import tiny_unet

            root = Path(tempfile.mkdtemp(prefix="difftool-triton-conformance-"))
            module = tiny_unet()
            export(module, root / "model.onnx")
            write_repository(
                root / "repo", "m", root / "model.onnx", UNetSignature.of(module), weights_id="conformance"
            )
            cls._repo = root / "repo"
        return cls._repo

    @contextlib.contextmanager
    def environment(self):
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            server = serve(self.repository(), Path(folder) / "triton.sock")
            self.options = {"url": f"unix:{Path(folder) / 'triton.sock'}"}
            try:
                yield
            finally:
                server.stop(0)


@pytest.mark.parametrize("name", ["../x", ".", "..", "a/b", "-x", "x" * 129])
def test_a_model_name_that_is_not_one_folder_is_refused_before_any_export(
    name: str, superres_model: Path, tmp_path: Path, monkeypatch
) -> None:
    """Issue 29 item 18: ``--name ../x`` or ``--name .`` ended in a traceback."""
    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "repo"
    args = ["export", "triton", "superres", "-o", str(repo), "--model", str(superres_model), "--name", name]
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # not a traceback
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [
        f"Error: --name {name!r} is not a model name (one folder in the repository); use letters, digits, _ . - "
        "(not starting with . or -), such as difftool_superres"
    ]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "x").exists()  # refused before any work
