"""The GPU paths end to end on the CPU: only the CUDA runtime and the ``tensorrt`` module are stand-ins.

:func:`difftool.testing.gpu.gpu_harness` answers for a GPU and runs TensorRT "engines" (the real ONNX
export) in ONNX Runtime, reading and writing the bound memory by pointer. Everything of difftool runs:
the preflight, the task, the export, the engine build and cache, refit, the denoiser's bindings.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from difftool import cli
from difftool.app import api
from difftool.core.errors import BackendUnavailableError, ParameterError
from difftool.testing.gpu import gpu_harness
from difftool.training.evaluate import psnr

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact cache for the module: an ONNX export costs seconds, and the tests share models.

    Each test that counts engine builds asks for shapes (a tile) no other test uses, so its engine is new.
    """
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(autouse=True)
def cache(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DIFFTOOL_CACHE", str(shared_cache))
    return shared_cache


def _score(a: api.RunResult, b: api.RunResult) -> float:
    return psnr(np.asarray(a.image, np.float32) / 255, np.asarray(b.image, np.float32) / 255)


def _engines(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "tensorrt").iterdir() if p.is_dir()) if (cache / "tensorrt").is_dir() else []


def test_superres_on_tensorrt_cuda_matches_onnx_and_reuses_its_engine(photo: Path, superres_model: Path, cache) -> None:
    common = {"model": str(superres_model), "scale": 2, "seed": 3, "dtype": "fp32", "tile": 512}
    reference = api.run("superres", photo, backend="onnx", **common)
    engines = len(_engines(cache))
    with gpu_harness() as harness:
        first = api.run("superres", photo, backend="tensorrt", device="cuda", **common)
        second = api.run("superres", photo, backend="tensorrt", device="cuda", **common)
    assert first.record["backend"] == "tensorrt" and first.record["device"] == "cuda"
    assert _score(reference, first) > 40 and np.array_equal(np.asarray(first.image), np.asarray(second.image))
    assert harness.trt.builds == 1 and len(_engines(cache)) == engines + 1  # built once, reused by the second run
    assert harness.trt.executions >= 2 and first.record["artifact"] == second.record["artifact"]


def test_cli_run_with_tensorrt_on_cuda(photo: Path, superres_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    args = ["run", "superres", str(photo), "--model", str(superres_model), "--scale", "2", "--seed", "1"]
    with gpu_harness() as harness:
        result = CliRunner().invoke(cli.cli, [*args, "--backend", "tensorrt", "--device", "cuda", "-o", str(out)])
    assert result.exit_code == 0, result.output
    onnx = api.run("superres", photo, model=str(superres_model), scale=2, seed=1, backend="onnx", dtype="fp16")
    assert harness.trt.builds == 1 and Image.open(out).size == (56, 40)
    assert psnr(np.asarray(Image.open(out), np.float32) / 255, np.asarray(onnx.image, np.float32) / 255) > 40


def test_inpaint_on_tensorrt_cuda_matches_onnx(photo: Path, inpaint_model: Path, tmp_path: Path) -> None:
    mask = tmp_path / "mask.png"
    hole = np.zeros((20, 28), np.uint8)
    hole[5:12, 8:20] = 255
    Image.fromarray(hole).save(mask)
    common = {"model": str(inpaint_model), "mask": str(mask), "seed": 2, "dtype": "fp32"}
    reference = api.run("inpaint", photo, backend="onnx", **common)
    with gpu_harness() as harness:
        result = api.run("inpaint", photo, backend="tensorrt", device="cuda", **common)
    assert harness.trt.builds == 1 and _score(reference, result) > 40


def test_tensorrt_11_builds_strongly_typed_from_the_fp16_export(photo: Path, superres_model: Path, cache) -> None:
    """TensorRT 11 has no BuilderFlag.FP16: the fp16 engine is the fp16 ONNX graph, strongly typed."""
    common = {"model": str(superres_model), "scale": 2, "seed": 3, "backend": "tensorrt", "device": "cuda", "tile": 88}
    with gpu_harness("11.0.0") as harness:
        result = api.run("superres", photo, dtype="fp16", **common)
        # no precision flag exists to set; the engine keeps its build weights, stripped from the plan
        assert harness.trt.build_flags == [["REFIT_IDENTICAL", "STRIP_PLAN"]]
        assert any("-fp16-" in p.name for p in (cache / "onnx").iterdir())
        with pytest.raises(ParameterError, match="TensorRT 11 builds the precision of the ONNX graph"):
            api.run("superres", photo, dtype="bf16", **common)
    reference = api.run("superres", photo, model=str(superres_model), scale=2, seed=3, dtype="fp32", tile=88)
    assert _score(reference, result) > 35
    with gpu_harness("10.16.0") as harness:
        api.run("superres", photo, dtype="fp16", **common)
    # TensorRT 10 too: the fp16 graph strongly typed (a weak FP16 build may run its fp32 layers in fp16)
    assert harness.trt.build_flags == [["REFIT_IDENTICAL", "STRIP_PLAN"]] and harness.trt.build_typed == [True]


def test_second_gpu_builds_keys_and_runs_on_that_gpu(photo: Path, superres_model: Path, cache) -> None:
    """--device cuda:1: builder, runtime and context are created with GPU 1 current; the key is GPU 1's."""
    import json

    with gpu_harness() as harness:
        api.run("superres", photo, model=str(superres_model), scale=2, seed=3, backend="tensorrt", device="cuda:1")
        with pytest.raises(BackendUnavailableError, match="there is no GPU 2"):
            api.run("superres", photo, model=str(superres_model), backend="tensorrt", device="cuda:2")
    assert {index for _, index in harness.trt.created_on} == {1}
    manifests = [json.loads((engine / "manifest.json").read_text())["components"] for engine in _engines(cache)]
    [components] = [c for c in manifests if "A2000" in c["gpu"]]  # GPU 0's engines are keyed by GPU 0
    assert components["compute_capability"] == "8.6" and components["gpu"].startswith("Fake RTX A2000")


@pytest.mark.parametrize(
    ("failure", "message"),
    [("deserialize", "could not load the engine"), ("context", "could not create an execution context")],
)
def test_tensorrt_returning_none_is_a_clear_error(photo: Path, superres_model: Path, failure, message) -> None:
    with gpu_harness() as harness:
        harness.trt.fail.add(failure)
        with pytest.raises(BackendUnavailableError, match=message):
            api.run("superres", photo, model=str(superres_model), scale=2, backend="tensorrt", device="cuda")


def test_a_rejected_timing_cache_is_replaced_not_ignored(photo: Path, superres_model: Path, cache, caplog) -> None:
    from difftool.runtimes.tensorrt.engine import gpu_identity, timing_cache_path

    common = {"model": str(superres_model), "scale": 2, "backend": "tensorrt", "device": "cuda", "seed": 1}
    with gpu_harness() as harness:
        api.run("superres", photo, tile=80, overlap=8, **common)
        timing = timing_cache_path(cache, harness.trt.version, (8, 9), gpu_identity("cuda:0"))
        assert timing.is_file()
        timing.write_bytes(b"a cache from another GPU")
        harness.trt.fail.add("timing_cache")
        api.run("superres", photo, tile=72, overlap=8, **common)  # another profile: a second build
    assert harness.trt.builds == 2 and "rejected the timing cache" in caplog.text
    assert timing.read_bytes().startswith(b"FAKETC1:")  # a timing cache again, not the foreign bytes


def test_cuda_graphs_replay_like_direct_execution_and_fall_back(photo: Path, superres_model: Path) -> None:
    common = {"model": str(superres_model), "scale": 2, "seed": 4, "backend": "tensorrt", "device": "cuda", "tile": 96}
    runs = {}
    with gpu_harness() as harness:
        for graphs in ("off", "on"):
            runs[graphs] = api.run("superres", photo, backend_options={"cuda_graphs": graphs}, **common)
        assert harness.cuda.captures >= 1
        harness.trt.fail.add("capture")  # a launch TensorRT cannot capture: direct execution from then on
        from difftool.runtimes.tensorrt.denoiser import recent_engines

        recent_engines().clear()
        runs["fallback"] = api.run("superres", photo, backend_options={"cuda_graphs": "on"}, **common)
    assert np.array_equal(np.asarray(runs["off"].image), np.asarray(runs["on"].image))
    assert np.array_equal(np.asarray(runs["off"].image), np.asarray(runs["fallback"].image))


def test_backend_options_are_declared_and_reach_the_engine(photo: Path, superres_model: Path) -> None:
    # a tile no other test uses: the engine is built here (other tests' engines stay cached)
    common = {"model": str(superres_model), "scale": 2, "backend": "tensorrt", "device": "cuda", "seed": 1, "tile": 104}
    with gpu_harness() as harness:
        with pytest.raises(ParameterError, match="workspace_gb=100 asks for more than the 20.0 GiB free"):
            api.run("superres", photo, backend_options={"workspace_gb": 100}, **common)
        with pytest.raises(ParameterError, match="has no option 'nope'"):
            api.run("superres", photo, backend_options={"nope": 1}, **common)
        assert harness.trt.builds == 0


# --- Stable Diffusion: generate on TensorRT, and a LoRA refits the engine instead of rebuilding it ------


def _sd_tools():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins" / "builtin"))
    from sd import tiny
    from sd.test_lora import make_lora

    return tiny, make_lora


def test_generate_on_tensorrt_matches_onnx_and_a_lora_refits(tmp_path: Path, cache) -> None:
    pytest.importorskip("peft")
    tiny, make_lora = _sd_tools()
    parts = tiny.components(seed=5)
    folder = tiny.save_folder(parts, tmp_path / "sd")
    lora = make_lora(parts["unet"], tmp_path / "lora" / "style.safetensors")
    common = {"model": str(folder), "prompt": "a kite", "width": 32, "height": 32, "steps": 2, "seed": 6}
    reference = api.run("generate", backend="onnx", dtype="fp32", **common)
    with gpu_harness() as harness:
        plain = api.run("generate", backend="tensorrt", device="cuda", dtype="fp32", **common)
        styled = api.run("generate", backend="tensorrt", device="cuda", dtype="fp32", lora=str(lora), **common)
    assert _score(reference, plain) > 40
    assert harness.trt.builds == 1 and harness.trt.refits == 1  # one engine, refitted for the LoRA
    lora_reference = api.run("generate", backend="onnx", dtype="fp32", lora=str(lora), **common)
    assert _score(lora_reference, styled) > 40 and "+" in styled.record["artifact"]


# --- defects the review found, shown without a GPU ----------------------------------------------------


def test_a_cached_module_is_never_moved_or_cast_in_place() -> None:
    from difftool.core.denoiser import TorchDenoiser
    from difftool.exporters.onnx import cpu_fp32

    module = torch.nn.Conv2d(3, 3, 3)
    module.config = type("Config", (), {"in_channels": 3, "out_channels": 3})()
    denoiser = TorchDenoiser(module, prediction_type="epsilon", device="meta", dtype=torch.float32)
    assert next(denoiser.module.parameters()).device.type == "meta"
    assert next(module.parameters()).device.type == "cpu"  # the caller's (cached) module stayed put
    half = module.to(torch.bfloat16)
    assert cpu_fp32(half) is not half and next(half.parameters()).dtype == torch.bfloat16


def test_onnx_runtime_falling_back_silently_is_refused() -> None:
    from difftool.runtimes.onnxruntime.denoiser import check_providers

    chain = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    check_providers(chain, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match="could not load CUDAExecutionProvider.*runs on CPUExecution"):
        check_providers(chain, ["CPUExecutionProvider"])  # what ORT leaves when the CUDA provider fails to load


def test_export_tensorrt_command_builds_the_engine_a_run_then_uses(photo: Path, inpaint_model: Path, tmp_path) -> None:
    """`difftool export tensorrt inpaint` ahead of time builds the engine a run with default parameters uses."""
    mask = tmp_path / "mask.png"
    Image.new("L", Image.open(photo).size, 255).save(mask)
    with gpu_harness() as harness:
        result = CliRunner().invoke(
            cli.cli, ["export", "tensorrt", "inpaint", "--model", str(inpaint_model), "--precision", "fp16"]
        )
        assert result.exit_code == 0, result.output
        assert "model.engine" in result.output and harness.trt.builds == 1
        api.run("inpaint", photo, model=str(inpaint_model), mask=str(mask), backend="tensorrt", device="cuda",
                dtype="fp16", seed=1)  # fmt: skip
        assert harness.trt.builds == 1  # the run found the engine the export built
        assert "--max-size" in CliRunner().invoke(cli.cli, ["export", "tensorrt", "--help"]).output


@pytest.mark.parametrize("kind", ["compact", "swinir"])
def test_community_upscalers_on_tensorrt_match_onnx(kind: str, tmp_path: Path) -> None:
    """A CNN (dynamic tiles) and a window-attention model (one fixed tile) as TensorRT engines."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins" / "builtin"))
    from safetensors.torch import save_file
    from test_upscalers import build

    state, scale = build(kind)
    path = tmp_path / f"{scale}x-{kind}.safetensors"
    save_file(state, path)
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    common = {"model": str(path), "dtype": "fp32", "seed": 0, "tile": 32 * scale, "overlap": 8 * scale}
    reference = api.run("superres", image, backend="onnx", **common)
    with gpu_harness() as harness:
        result = api.run("superres", image, backend="tensorrt", device="cuda", **common)
    assert harness.trt.builds == 1 and harness.trt.executions > 1 and result.record["backend"] == "tensorrt"
    diff = np.abs(np.asarray(reference.image, dtype=int) - np.asarray(result.image, dtype=int))
    assert diff.max() <= 1 and result.image.size == (90 * scale, 70 * scale)
