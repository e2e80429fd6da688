"""ONNX export parity, the onnx backend driving unchanged tasks, and the CLI commands (CPU)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.core.errors import ParameterError

pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")

from difftool.app import api  # noqa: E402
from difftool.exporters.cache import ArtifactCache  # noqa: E402
from difftool.exporters.onnx import UNetSignature, cached_export  # noqa: E402
from difftool.plugins.builtin.pixel_model import load_pixel_model  # noqa: E402
from difftool.runtimes.onnxruntime.denoiser import OnnxRuntimeDenoiser  # noqa: E402
from difftool.training.evaluate import psnr  # noqa: E402


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path_factory.getbasetemp() / "artifact-cache"  # shared by this module's tests: one export each
    monkeypatch.setenv("DIFFTOOL_CACHE", str(root))
    return root


@pytest.mark.parametrize(
    ("task", "fixture"),
    [
        ("superres", "superres_model"),
        ("inpaint", "inpaint_model"),
        ("superres", "srnet_model"),
        ("inpaint", "inpaintnet_model"),
    ],
)
def test_export_matches_pytorch_at_odd_sizes(task: str, fixture: str, request: pytest.FixtureRequest) -> None:
    model = load_pixel_model(request.getfixturevalue(fixture), task)
    entry = cached_export(model.unet, name=f"test-{fixture}", model_id=model.sha256)
    assert entry.manifest["validation"]["max_relative_error"] <= 1e-4
    assert entry.manifest["components"]["opset"] >= 17
    signature = UNetSignature.of(model.unet)
    denoiser = OnnxRuntimeDenoiser(entry.file("model.onnx"), signature, prediction_type="sample", sample_channels=3)
    g = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 3, 72, 104, generator=g)
    cond = {"concat": torch.randn(2, signature.in_channels - 3, 72, 104, generator=g)}
    if signature.class_labels:
        cond["class_labels"] = torch.tensor([1])
    with torch.no_grad():
        labels = cond.get("class_labels")
        expected = model.unet(
            torch.cat([sample, cond["concat"]], 1),
            torch.tensor(400.0),
            class_labels=None if labels is None else labels.expand(2),
        ).sample
    actual = denoiser(sample, torch.tensor(400.0), cond)
    relative = float((actual - expected).abs().max() / expected.abs().max())
    assert relative <= 1e-4


def test_srnet_runs_on_the_onnx_backend_at_both_scales(srnet_model: Path, photo: Path, registry) -> None:
    for scale in ("2", "4"):
        kwargs = {"model": str(srnet_model), "scale": scale, "seed": 3, "registry": registry, "dtype": "fp32"}
        torch_out = api.run("superres", photo, **kwargs)
        onnx_out = api.run("superres", photo, backend="onnx", **kwargs)
        assert onnx_out.record["backend"] == "onnx" and onnx_out.image.size == torch_out.image.size
        assert psnr(np.asarray(torch_out.image), np.asarray(onnx_out.image)) > 40.0


def test_tasks_run_unchanged_on_the_onnx_backend(superres_model: Path, inpaint_model: Path, photo: Path, registry):
    kwargs = {"model": str(superres_model), "scale": "2", "seed": 3, "registry": registry, "dtype": "fp32"}
    torch_out = api.run("superres", photo, **kwargs)
    onnx_out = api.run("superres", photo, backend="onnx", **kwargs)
    assert onnx_out.record["backend"] == "onnx" and onnx_out.record["artifact"]
    assert psnr(np.asarray(torch_out.image), np.asarray(onnx_out.image)) > 40.0

    mask = Image.new("L", (28, 20), 0)
    mask.paste(255, (5, 5, 15, 12))
    a = api.run("inpaint", photo, mask=mask, model=str(inpaint_model), seed=1, registry=registry, dtype="fp32")
    b = api.run("inpaint", photo, mask=mask, model=str(inpaint_model), seed=1, registry=registry, backend="onnx")
    assert psnr(np.asarray(a.image), np.asarray(b.image)) > 40.0


def test_cli_export_and_cache_commands(superres_model: Path, tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from difftool import cli

    private_cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFTOOL_CACHE", str(private_cache))
    runner = CliRunner()
    result = runner.invoke(cli.cli, ["export", "onnx", "--model", str(superres_model)])
    assert result.exit_code == 0, result.output
    assert "model.onnx" in result.output and "max relative error" in result.output
    assert "ok" in runner.invoke(cli.cli, ["cache", "list"]).output
    assert runner.invoke(cli.cli, ["cache", "verify"]).exit_code == 0
    onnx_file = next(private_cache.rglob("model.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes()[:100])  # truncated
    verify = runner.invoke(cli.cli, ["cache", "verify"])
    assert verify.exit_code == 1 and "BROKEN" in verify.output
    rebuilt = runner.invoke(cli.cli, ["export", "onnx", "--model", str(superres_model)])
    assert rebuilt.exit_code == 0 and runner.invoke(cli.cli, ["cache", "verify"]).exit_code == 0
    assert ArtifactCache(private_cache).entries()


def test_unsupported_module_is_refused_before_work() -> None:
    from difftool.core.errors import ModelError

    with pytest.raises(ModelError, match="supports diffusers U-Nets, not Linear"):
        UNetSignature.of(torch.nn.Linear(2, 2))
    from diffusers import UNet2DConditionModel

    per_block = UNet2DConditionModel(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=(16, 32),
        sample_size=8,
    )
    with pytest.raises(ModelError, match="does not support this U-Net's conditioning"):
        UNetSignature.of(per_block)


def test_check_backends_compares_every_backend(superres_model: Path, photo: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from difftool import cli

    result = CliRunner().invoke(cli.cli, ["check-backends", "superres", str(photo), "--model", str(superres_model)])
    assert result.exit_code == 0, result.output
    assert re.search(r"onnx fp32 +PSNR", result.output) and re.search(r"torch bf16 +PSNR", result.output)
    assert "unavailable" in result.output and "tensorrt" in result.output


def test_the_optimised_model_is_cached_and_gives_the_same_output(superres_model: Path) -> None:
    import time

    from difftool.runtimes.onnxruntime.denoiser import make_session

    model = load_pixel_model(superres_model, "superres")
    entry = cached_export(model.unet, name="test-superres", model_id=model.sha256)
    assert entry.manifest["optimized"] and "model.opt.onnx" in entry.files
    sample = np.random.default_rng(0).standard_normal((1, 6, 24, 40)).astype(np.float32)
    feeds = {"sample": sample, "timestep": np.array([300.0], np.float32)}
    timings, outputs = {}, {}
    for name in ("model.onnx", "model.opt.onnx"):
        started = time.perf_counter()
        session = make_session(entry.file(name), "cpu")
        timings[name] = time.perf_counter() - started
        outputs[name] = session.run(None, feeds)[0]
    assert np.abs(outputs["model.onnx"] - outputs["model.opt.onnx"]).max() < 1e-4
    print(f"session creation: {timings}")  # figures only; not asserted (timing in unit tests is noise)


def test_fp16_export_keeps_fp32_io_and_guards(superres_model: Path, tmp_path: Path, monkeypatch) -> None:
    import onnx
    from click.testing import CliRunner

    from difftool import cli

    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(cli.cli, ["export", "onnx", "--model", str(superres_model), "--precision", "fp16"])
    assert result.exit_code == 0, result.output
    entry_dir = next((tmp_path / "cache").rglob("model.onnx")).parent
    manifest = ArtifactCache(tmp_path / "cache").entries()
    assert len(manifest) == 1 and manifest[0][1]
    model = onnx.load(str(entry_dir / "model.onnx"))
    float_types = {onnx.TensorProto.FLOAT}
    assert {i.type.tensor_type.elem_type for i in model.graph.input if i.name != "class_labels"} == float_types
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [i for i in model.graph.initializer if len(i.dims) == 4]  # conv kernels
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    # The guards: normalisations and the sinusoidal timestep embedding run in fp32.
    kept = {n.op_type for n in model.graph.node if n.op_type in ("Sin", "Cos", "InstanceNormalization")}
    assert kept == {"Sin", "Cos", "InstanceNormalization"}
    for node in model.graph.node:
        if node.op_type in ("Sin", "Cos", "InstanceNormalization"):
            # their input comes from a Cast to float (or from other fp32 nodes), never fp16 initializers
            assert not any(
                i.name in node.input and i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer
            )


def test_fp16_task_run_matches_pytorch(superres_model: Path, photo: Path, registry) -> None:
    kwargs = {"model": str(superres_model), "scale": "2", "seed": 3, "registry": registry}
    reference = api.run("superres", photo, dtype="fp32", **kwargs)
    half = api.run("superres", photo, backend="onnx", dtype="fp16", **kwargs)
    assert half.record["precision"] == "float16" and half.record["artifact"]
    assert psnr(np.asarray(reference.image), np.asarray(half.image)) > 35.0


def test_timestep_embedding_nodes_stay_fp32() -> None:
    import onnx
    from onnx import helper

    from difftool.exporters.onnx_fp16 import timestep_nodes

    f = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["timestep", "axes"], ["t1"], name="unsq"),
            helper.make_node("Mul", ["t1", "freqs"], ["arg"], name="mul"),
            helper.make_node("Sin", ["arg"], ["s"], name="sin"),
            helper.make_node("Cos", ["arg"], ["c"], name="cos"),
            helper.make_node("Concat", ["s", "c"], ["emb"], name="cat", axis=1),
            helper.make_node("Gemm", ["emb", "w"], ["h"], name="linear"),
            helper.make_node("Add", ["h", "sample"], ["out"], name="add"),
        ],
        "g",
        [helper.make_tensor_value_info(n, f, None) for n in ("timestep", "sample")],
        [helper.make_tensor_value_info("out", f, None)],
    )
    assert timestep_nodes(graph) == ["unsq", "mul", "sin", "cos", "cat"]


def test_fp16_overflow_is_an_error_not_a_model(tmp_path: Path) -> None:
    from diffusers import UNet2DModel

    from difftool.core.errors import ModelError
    from difftool.exporters.onnx import export, validate

    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with torch.no_grad():
        unet.conv_out.weight.fill_(3e4)  # output values far beyond fp16's 65504
    path = tmp_path / "model.onnx"
    export(unet, path, "fp16")
    with pytest.raises(ModelError, match="overflows: conv_out reaches"):
        validate(unet, path, "fp16")


def test_provider_chain_puts_the_choice_first_with_fallbacks(tmp_path: Path) -> None:
    from difftool.core.errors import ParameterError
    from difftool.runtimes.onnxruntime.denoiser import provider_chain

    assert provider_chain("cpu", "auto") == ["CPUExecutionProvider"]
    assert provider_chain("cuda:1", "auto") == [
        ("CUDAExecutionProvider", {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC"}),
        "CPUExecutionProvider",
    ]
    trt = provider_chain("cuda", "tensorrt", fp16=True, cache_dir=tmp_path)
    assert [p if isinstance(p, str) else p[0] for p in trt] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert trt[0][1]["trt_fp16_enable"] and trt[0][1]["trt_engine_cache_path"] == str(tmp_path)
    with pytest.raises(ParameterError, match="runs on a GPU"):
        provider_chain("cpu", "cuda")
    with pytest.raises(ParameterError, match="unknown ONNX Runtime provider 'rocm'"):
        provider_chain("cuda", "rocm")


def test_a_missing_provider_is_named_with_the_fix(superres_model: Path, monkeypatch) -> None:
    import onnxruntime

    from difftool.core.errors import BackendUnavailableError
    from difftool.runtimes.onnxruntime.denoiser import make_session

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match="no CUDAExecutionProvider here.*onnxruntime-gpu"):
        make_session(Path("unused.onnx"), "cuda")


def test_io_binding_gives_what_session_run_gives(superres_model: Path) -> None:
    """The denoiser binds torch tensors by pointer; the plain numpy path must agree bit for bit."""
    model = load_pixel_model(superres_model, "superres")
    entry = cached_export(model.unet, name="test-superres", model_id=model.sha256)
    signature = UNetSignature.of(model.unet)
    denoiser = OnnxRuntimeDenoiser(entry.file("model.onnx"), signature, prediction_type="sample", sample_channels=3)
    g = torch.Generator().manual_seed(9)
    sample = torch.randn(2, 3, 40, 56, generator=g)
    concat = torch.randn(2, signature.in_channels - 3, 40, 56, generator=g)
    cond = {"concat": concat, "class_labels": torch.tensor([1])} if signature.class_labels else {"concat": concat}
    bound = denoiser(sample, torch.tensor([300.0, 700.0]), cond)
    feeds = {"sample": torch.cat([sample, concat], 1).numpy(), "timestep": np.array([300.0, 700.0], np.float32)}
    if signature.class_labels:
        feeds["class_labels"] = np.array([1, 1], np.int64)
    plain = denoiser.session.run(None, feeds)[0]
    assert bound.shape == (2, 3, 40, 56) and np.array_equal(bound.numpy(), plain)
    with pytest.raises(ValueError, match="needs encoder_hidden_states"):
        from difftool.exporters.onnx import graph_inputs

        graph_inputs(
            UNetSignature(4, 8, False, 4, context_dim=32), torch.zeros(2, 4, 40, 56), torch.tensor(1.0), {}, "cpu"
        )
    with pytest.raises(ParameterError, match="takes 4 input channels"):
        from difftool.exporters.onnx import graph_inputs

        graph_inputs(UNetSignature(4, 8, False, 4, context_dim=32), sample, torch.tensor(1.0), {}, "cpu")


def test_sessions_are_reused_while_the_file_is_unchanged(superres_model: Path, tmp_path: Path) -> None:
    import shutil

    from difftool.runtimes.onnxruntime.denoiser import make_session

    model = load_pixel_model(superres_model, "superres")
    entry = cached_export(model.unet, name="test-superres", model_id=model.sha256)
    path = tmp_path / "model.onnx"
    shutil.copy(entry.file("model.onnx"), path)
    first = make_session(path, "cpu")
    assert make_session(path, "cpu") is first  # the next image of a folder job: no reload
    shutil.copy(entry.file("model.onnx"), tmp_path / "new.onnx")
    (tmp_path / "new.onnx").replace(path)  # a rebuilt file at the same path
    assert make_session(path, "cpu") is not first


def test_fp16_graphs_are_put_in_topological_order() -> None:
    """ONNX Runtime's fp16 converter appends input casts after their readers; strict parsers refuse that."""
    import onnx
    from onnx import TensorProto, helper

    from difftool.exporters.onnx_fp16 import sort_nodes

    vector = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "z")]
    then = helper.make_graph([helper.make_node("Identity", ["c"], ["t"])], "then", [], [vector[1]])  # reads c outside
    then.output[0].name = "t"
    nodes = [
        helper.make_node("Clip", ["y", "", "m"], ["z0"]),  # "" is an omitted optional input
        helper.make_node("If", ["flag"], ["z"], then_branch=then, else_branch=then),
        helper.make_node("Relu", ["c"], ["y"]),
        helper.make_node("Greater", ["x", "x"], ["flag"]),
        helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("Identity", ["x"], ["m"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [vector[0]], [vector[1]]))
    sort_nodes(model.graph)
    order = [n.op_type for n in model.graph.node]
    assert order.index("Cast") < order.index("If") and order.index("Cast") < order.index("Relu") < order.index("Clip")
    onnx.checker.check_model(model)
