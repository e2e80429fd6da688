"""ONNX export of Stable Diffusion U-Nets (SD 1.x, 9-channel inpainting, SDXL) and SD tasks on --backend onnx."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")

from difftool.app import api
from difftool.core.errors import ParameterError  # noqa: E402
from difftool.exporters.onnx import UNetSignature, cached_export  # noqa: E402
from difftool.training.evaluate import psnr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "builtin"))
from sd import tiny  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path_factory.getbasetemp() / "sd-artifact-cache"
    monkeypatch.setenv("DIFFTOOL_CACHE", str(root))
    return root


@pytest.mark.parametrize(("in_channels", "xl"), [(4, False), (9, False), (4, True)], ids=["sd", "inpaint", "sdxl"])
def test_sd_unet_export_matches_pytorch_at_odd_sizes(in_channels: int, xl: bool) -> None:
    unet = tiny.components(in_channels=in_channels, xl=xl, seed=7)["unet"]
    signature = UNetSignature.of(unet)
    assert signature.context_dim == unet.config.cross_attention_dim
    assert bool(signature.text_embeds_dim) == xl and signature.in_channels == in_channels
    entry = cached_export(unet, name=f"test-sd-{in_channels}-{xl}")
    report = entry.manifest["validation"]
    shapes = [tuple(s["shape"]) for s in report["shapes"]]
    assert (1, in_channels, 18, 26) in shapes  # odd latent sizes (9 x 13 in multiples of 2)
    assert report["max_relative_error"] <= 1e-4


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_sd_unet_fp16_export_is_within_tolerance(xl: bool) -> None:
    unet = tiny.components(xl=xl, seed=8)["unet"]
    entry = cached_export(unet, name=f"test-sd16-{xl}", precision="fp16")
    report = entry.manifest["validation"]
    assert entry.manifest["components"]["precision"] == "fp16" and report["tolerance"] == 2e-2
    assert 0 < report["max_relative_error"] <= 2e-2  # fp16 rounding is visible, but small


def test_generate_runs_unchanged_on_the_onnx_backend(tmp_path: Path) -> None:
    folder = tiny.save_folder(tiny.components(seed=12), tmp_path / "model")
    common = dict(model=str(folder), prompt="a kite", width=40, height=24, steps=3, seed=2, dtype="fp32")
    torch_out = api.run("generate", **common)
    onnx_out = api.run("generate", backend="onnx", **common)
    assert onnx_out.record["backend"] == "onnx" and onnx_out.record["artifact"]
    a, b = (np.asarray(r.images[0], np.float32) / 255 for r in (torch_out, onnx_out))
    assert psnr(a, b) > 40


def test_structure_hash_ignores_weights_only() -> None:
    """Refittable TensorRT engines are keyed by it: a LoRA'd or fine-tuned U-Net must share it."""
    from difftool.exporters.onnx import structure_hash

    exports = {  # "a" and "xl" are the cached exports of the parity test above
        name: cached_export(tiny.components(in_channels=4, xl=xl, seed=seed)["unet"], name=cache_name)
        for name, seed, xl, cache_name in (
            ("a", 7, False, "test-sd-4-False"),
            ("b", 9, False, "test-structure-b"),
            ("xl", 7, True, "test-sd-4-True"),
        )
    }
    hashes = {name: structure_hash(entry.file("model.onnx")) for name, entry in exports.items()}
    assert exports["a"].manifest["key"] != exports["b"].manifest["key"]
    assert hashes["a"] == hashes["b"] != hashes["xl"]


def test_cli_exports_a_stable_diffusion_checkpoint(tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from difftool import cli
    from difftool.exporters.cache import ArtifactCache

    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    folder = tiny.save_folder(tiny.components(seed=7), tmp_path / "model")  # the parity test's weights
    result = CliRunner().invoke(cli.cli, ["export", "onnx", "--model", str(folder)])
    assert result.exit_code == 0, result.output
    assert "model.onnx" in result.output and "max relative error" in result.output
    [(entry, ok)] = ArtifactCache(tmp_path / "cache").entries()
    assert ok and entry.name.startswith("unet-")


def _runners(model, context=None):
    from difftool.plugins.builtin.sd.pipeline import _encoder_runners

    return _encoder_runners(model, context)


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_whole_pipeline_in_onnx_runtime_calls_no_torch_text_encoder_or_vae(
    xl: bool, tmp_path: Path, monkeypatch
) -> None:
    from difftool.plugins.builtin.sd import models

    folder = tiny.save_folder(tiny.components(seed=13, xl=xl), tmp_path / "model")
    common = dict(model=str(folder), prompt="a (red:1.3) kite", width=40, height=24, steps=3, seed=2, dtype="fp32")
    photo = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((24, 32, 3)) * 255).astype(np.uint8)).save(photo)
    style = dict(model=str(folder), prompt="ink", steps=3, strength=0.6, seed=2, dtype="fp32")
    references = {skip: api.run("generate", clip_skip=skip, **common) for skip in (1, 2)}
    references["style"] = api.run("style", photo, **style)
    whole = {"backend": "onnx", "backend_options": {"export": "all"}}
    first = api.run("generate", clip_skip=1, **whole, **common)  # exports the parts
    monkeypatch.setenv("DIFFTOOL_ONNX_EXPORT", "all")  # the option's documented default
    api.run("style", photo, backend="onnx", **style)  # and the VAE encoder
    [model] = models._loaded().values()
    ids = torch.randint(0, 99, (1, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = [(first, hidden[-3], normed(-2)) for first, hidden, normed in (r(ids, ()) for r in _runners(model))]

    def torch_ran(*args, **kwargs):
        raise AssertionError("a torch text encoder or VAE decoder ran")

    for encoder in model.text_encoders:
        monkeypatch.setattr(encoder, "forward", torch_ran)
    monkeypatch.setattr(model.vae, "decode", torch_ran)
    monkeypatch.setattr(model.vae, "encode", torch_ran)
    second = api.run("generate", backend="onnx", clip_skip=2, **common)  # clip skip: chosen at run time
    styled = api.run("style", photo, backend="onnx", **style)
    for key, result in ((1, first), (2, second), ("style", styled)):
        a, b = (np.asarray(r.images[0], np.float32) / 255 for r in (references[key], result))
        assert psnr(a, b) > 40, key
    # What clip skip reads (any layer, normalised or not) matches PyTorch, not only the final images.
    onnx_runs = _runners(model, SimpleNamespace(backend=SimpleNamespace(name="onnx", options={"export": "all"}),
                                                device="cpu"))  # fmt: skip
    for (first_t, layer_t, normed_t), run in zip(expected, onnx_runs, strict=True):
        first_o, hidden_o, normed_o = run(ids, ())
        for want, got in ((first_t, first_o), (layer_t, hidden_o[-3]), (normed_t, normed_o(-2))):
            assert float((want - got).abs().max() / want.abs().max()) < 1e-4
    with pytest.raises(ParameterError, match=r"option export \(from DIFFTOOL_ONNX_EXPORT\): unknown value 'some'"):
        monkeypatch.setenv("DIFFTOOL_ONNX_EXPORT", "some")
        api.run("generate", backend="onnx", **common)


def test_check_backends_takes_any_task_and_its_parameters(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from difftool import cli

    folder = tiny.save_folder(tiny.components(seed=12), tmp_path / "model")
    args = ["check-backends", "generate", "--model", str(folder), "-p", "prompt=a kite", "-p", "width=40"]
    result = CliRunner().invoke(cli.cli, [*args, "-p", "height=24", "-p", "steps=2"])
    assert result.exit_code == 0, result.output
    assert float(re.search(r"onnx fp32 +PSNR (\S+) dB", result.output).group(1)) > 40
    assert re.search(r"onnx bf16 +PSNR \S+ dB vs torch fp32 \(ran in float32\)", result.output)
    assert re.search(r"torch bf16 +PSNR", result.output) and "tensorrt  " in result.output
    bad = CliRunner().invoke(cli.cli, [*args, "-p", "steps"])
    assert bad.exit_code == 2 and "'steps' is not NAME=VALUE" in bad.output


def test_long_prompts_run_on_onnx_whole_pipeline_and_tensorrt_within_the_declared_token_range(tmp_path: Path) -> None:
    """Issue 17: a 2-chunk prompt (154 tokens) on ONNX (U-Net, and text encoders with export=all) and on
    TensorRT (stand-ins), whose engine declares the text length as a multiple of 77."""
    from difftool.plugins.builtin.sd.tasks import prompt_tokens
    from difftool.testing.gpu import gpu_harness

    assert prompt_tokens("a kite", None) == (77, 77, 231)
    assert prompt_tokens(" ".join(["kite"] * 300), "") == (77, 77, 77 * 5)  # 4 chunks, one spare
    folder = tiny.save_folder(tiny.components(seed=5), tmp_path / "sd")
    long = "a red kite, " + " ".join(["sky"] * 90) + ", zebra"
    common = {"model": str(folder), "prompt": long, "width": 32, "height": 32, "steps": 2, "seed": 6, "dtype": "fp32"}
    reference = api.run("generate", **common)
    shorter = api.run("generate", **{**common, "prompt": long.replace("zebra", "horse")})
    assert not np.array_equal(np.asarray(reference.images[0]), np.asarray(shorter.images[0]))  # word 92 counts
    runs = {
        "onnx": api.run("generate", backend="onnx", **common),
        "onnx-all": api.run("generate", backend="onnx", backend_options={"export": "all"}, **common),
    }
    with gpu_harness():
        runs["tensorrt"] = api.run("generate", backend="tensorrt", device="cuda", **common)
    for name, result in runs.items():
        a, b = (np.asarray(r.images[0], np.float32) / 255 for r in (reference, result))
        assert psnr(a, b) > 40, name


def test_tensorrt_engine_covers_a_short_side_under_eight_latent_cells(tmp_path: Path) -> None:
    """With an 8x VAE, 96 x 32 px is 12 x 4 latents (multiples of this U-Net's 2): the engine's declared
    minimum comes from the short side, so TensorRT (stand-ins, which refuse shapes outside the profile
    as TensorRT does) runs it. 96 x 40 px (5 rows) cannot run on an exported U-Net: refused in one line."""
    from difftool.core.errors import ParameterError
    from difftool.plugins.builtin.sd.tasks import latent_shapes
    from difftool.testing.gpu import gpu_harness

    assert latent_shapes((96, 32), 7.0).size == (4, 12, 128)
    assert latent_shapes((32, 96), 7.0, exact=False).size == latent_shapes((640, 480), 7.0, exact=False).size
    assert latent_shapes((32, 96), 7.0, exact=False).size == (1, 64, 128)  # one engine for a whole folder
    assert latent_shapes((512, 768), 7.0).size == (8, 96, 128)
    folder = tiny.save_folder(tiny.components(vae_levels=4, seed=5), tmp_path / "sd")
    common = {"model": str(folder), "prompt": "a kite", "width": 96, "height": 32, "steps": 2, "seed": 6}
    common["dtype"] = "fp32"
    reference = api.run("generate", **common)
    with gpu_harness() as harness:
        result = api.run("generate", backend="tensorrt", device="cuda", **common)
        with pytest.raises(ParameterError, match="multiples of 16 px; the height is 40") as refused:
            api.run("generate", backend="tensorrt", device="cuda", **{**common, "height": 40})
    assert "pass a height such as 32, or use --backend torch" in refused.value.fix
    assert harness.trt.builds == 1 and result.images[0].size == (96, 32)
    a, b = (np.asarray(r.images[0], np.float32) / 255 for r in (reference, result))
    assert psnr(a, b) > 40
    with pytest.raises(ParameterError, match="multiples of 16 px; the width is 88"):
        api.run("generate", backend="onnx", **{**common, "width": 88})


def test_exported_graph_refuses_sides_off_its_multiple_in_one_line() -> None:
    """The check under every exported runtime (ONNX Runtime, TensorRT): the graph's skip connections
    would not line up, and the runtime's own error would say so in its terms."""
    import torch

    from difftool.core.errors import ParameterError
    from difftool.exporters.onnx import UNetSignature, graph_inputs

    signature = UNetSignature(in_channels=4, multiple=8, class_labels=False, out_channels=4)
    ok = graph_inputs(signature, torch.zeros(1, 4, 64, 16), 10, {}, "cpu")
    assert ok["sample"].shape == (1, 4, 64, 16)
    with pytest.raises(ParameterError, match="multiples of 8, got 16x60"):
        graph_inputs(signature, torch.zeros(1, 4, 60, 16), 10, {}, "cpu")
