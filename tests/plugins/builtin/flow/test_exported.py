"""SD3's and Flux's transformer exported to ONNX: ONNX Runtime on the CPU, TensorRT on the stand-ins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from difftool.app import api
from difftool.core.params import ExportShapes
from difftool.plugins.builtin.flow import onnx_parts
from difftool.plugins.builtin.flow.exported import side_range, transformer_profile
from difftool.plugins.builtin.flow.onnx_parts import TransformerSignature, export_copy
from difftool.plugins.builtin.sd.tasks import latent_shapes

from . import tiny

COMMON = {"prompt": "a red fox in snow", "width": 32, "height": 24, "steps": 3, "seed": 5, "dtype": "fp32"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow-export")
    return {"flux": tiny.save_folder(tiny.flux(), root / "flux"), "sd3": tiny.save_folder(tiny.sd3(), root / "sd3")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flow-cache")  # one export per model for the module's tests


@pytest.fixture(autouse=True)
def module_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DIFFTOOL_CACHE", str(cache))
    return cache


def max_diff(a: Any, b: Any) -> int:
    return int(np.abs(np.asarray(a.images[0], np.int16) - np.asarray(b.images[0], np.int16)).max())


def manifests(root: Path, kind: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / kind).glob("*/manifest.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_onnx_runtime_on_the_cpu_matches_torch(arch: str, folders: dict, module_cache: Path) -> None:
    reference = api.run("generate", model=str(folders[arch]), **COMMON)
    result = api.run("generate", model=str(folders[arch]), backend="onnx", **COMMON)
    assert max_diff(reference, result) <= 2  # measured: 1
    assert result.record["backend"] == "onnx" and result.record["model_family"] == arch
    (export,) = [m for m in manifests(module_cache, "onnx") if m["name"].startswith(f"transformer-{arch}")]
    assert export["validation"]["max_relative_error"] <= onnx_parts.TOLERANCE
    assert result.record["artifact"] == export["key"]  # the run names the export it ran
    assert {c["shapes"]["hidden_states"][0] for c in export["validation"]["checks"]} == {1, 3}  # batch is dynamic


@pytest.mark.slow
def test_tensorrt_builds_flux_with_token_counts_from_the_declared_sizes(folders: dict) -> None:
    from difftool.testing.gpu import gpu_harness

    reference = api.run("generate", model=str(folders["flux"]), **COMMON)
    with gpu_harness() as harness:
        result = api.run("generate", model=str(folders["flux"]), backend="tensorrt", device="cuda", **COMMON)
    assert max_diff(reference, result) <= 2
    # generate declares 24..32..1024 px (Stable Diffusion's 3..4..128 cells of 8 px); this VAE's cells are
    # 2 px and Flux packs 2 x 2 cells into a token: sides 12..16..512 cells, (side / 2)^2 tokens; no CFG batch
    (profiles,) = harness.trt.build_profiles
    assert profiles[0]["hidden_states"] == [[1, 36, 64], [1, 64, 64], [1, 65536, 64]]
    assert profiles[0]["img_ids"] == [[36, 3], [64, 3], [65536, 3]]
    assert profiles[0]["encoder_hidden_states"] == [[1, 512, 32]] * 3  # Flux dev's T5 length
    assert harness.trt.build_flags[0] and harness.trt.executions == COMMON["steps"]
    with gpu_harness("11.0.0") as eleven:  # TensorRT 11 builds strongly typed networks only: the fp32 export's
        api.run("generate", model=str(folders["flux"]), backend="tensorrt", device="cuda", **COMMON)
    assert eleven.trt.build_typed == [True]


@pytest.mark.slow
def test_tensorrt_builds_sd3_with_the_cfg_batch_on_the_stand_ins(folders: dict) -> None:
    from difftool.testing.gpu import gpu_harness

    reference = api.run("generate", model=str(folders["sd3"]), **COMMON)
    with gpu_harness() as harness:
        result = api.run("generate", model=str(folders["sd3"]), backend="tensorrt", device="cuda", **COMMON)
    assert max_diff(reference, result) <= 2
    (profiles,) = harness.trt.build_profiles
    # CFG doubles the batch; the latent's sides stop at this model's position embedding (16 x 2 cells)
    assert profiles[0]["hidden_states"] == [[1, 16, 12, 12], [2, 16, 16, 16], [2, 16, 32, 32]]
    assert profiles[0]["encoder_hidden_states"][2] == [2, 77 + 256, 64]


@pytest.mark.slow
def test_weights_past_the_threshold_go_to_external_data(folders: dict, tmp_path: Path, monkeypatch) -> None:
    """A Flux-size transformer (over 2 GB, protobuf's limit) is saved with its weights beside model.onnx; the
    threshold is lowered here so the tiny model takes that path."""
    import onnx

    from difftool.exporters import onnx_modules

    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_modules, "EXTERNAL_DATA_BYTES", 10_000)
    reference = api.run("generate", model=str(folders["sd3"]), **COMMON)
    result = api.run("generate", model=str(folders["sd3"]), backend="onnx", **COMMON)
    assert max_diff(reference, result) <= 2
    (export,) = manifests(tmp_path / "cache", "onnx")
    data = [name for name in export["files"] if name != "model.onnx"]
    assert data, export["files"]  # the weights' file, hashed into the manifest like model.onnx
    folder = next((tmp_path / "cache" / "onnx").iterdir())
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    outside = [t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    matrices = [t.name for t in graph.initializer if t.name.startswith("module.") and len(t.dims) >= 2]
    assert matrices and set(matrices) <= set(outside)  # the weight matrices, read by ONNX Runtime from data[0]


def test_profiles_count_tokens_from_the_declared_image_size() -> None:
    """Flux.1 at 1024 px (8 px cells): 4096 image tokens; at 512..1024 px, 1024..4096."""
    flux = TransformerSignature("flux", 16, text_dim=4096, pooled_dim=768, in_features=64, guidance=True)
    sides = side_range(latent_shapes((1024, 1024), 3.5), (128, 128), vae_scale=8, patch=2)
    assert sides == (8, 128, 128)
    profile = transformer_profile(flux, (1, 1, 1), sides, 512)
    assert profile.shapes["hidden_states"] == ((1, 16, 64), (1, 4096, 64), (1, 4096, 64))
    declared = ExportShapes(batch=(1, 1, 1), size=(64, 64, 128))
    profile = transformer_profile(flux, (1, 1, 1), side_range(declared, (64, 64), 8, 2), 512)
    assert [shape[1] for shape in profile.shapes["hidden_states"]] == [1024, 1024, 4096]
    assert profile.shapes["txt_ids"][0] == (512, 3) and profile.shapes["guidance"][2] == (1,)
    assert side_range(None, (40, 96), 8, 2) == (8, 96, 128)  # nothing declared: 64 px to 1024 px


def test_the_export_crop_of_sd3_position_embedding_is_diffusers_own() -> None:
    from diffusers.models.embeddings import PatchEmbed

    for side in (16, 15):
        embed = PatchEmbed(height=32, width=32, patch_size=2, in_channels=16, embed_dim=8, pos_embed_max_size=side)
        for h in range(1, side + 1):
            for w in (1, 4, 5, side):
                want = embed.cropped_pos_embed(2 * h, 2 * w)
                assert torch.equal(onnx_parts._cropped_pos_embed(embed, 2 * h, 2 * w), want)


def test_fp8_weights_are_exported_upcast_without_casting_hooks() -> None:
    from difftool.plugins.builtin.flow.fp8 import keep_in_fp8

    wide = tiny.flux()["transformer"]
    with torch.no_grad():
        for p in wide.parameters():
            p.copy_(p.to(torch.float8_e4m3fn).float())  # the weights fp8 storage holds, in fp32
    stored = tiny.flux()["transformer"]
    stored.load_state_dict(wide.state_dict())
    for p in stored.parameters():  # as loaded from an fp8 file
        p.data = p.data.to(torch.float8_e4m3fn)
    keep_in_fp8(stored, torch.float8_e4m3fn, torch.float32)
    assert stored.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    copy = export_copy(stored)
    assert copy.transformer_blocks[0].attn.to_q.weight.dtype == torch.float32
    assert stored.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn  # the model is untouched
    signature = TransformerSignature.of(stored, "flux")
    inputs = onnx_parts.example_inputs(signature, 1, 3, 2, 5)
    with torch.no_grad():
        got = onnx_parts.graph_of(copy, signature)(*inputs.values())
        want = onnx_parts.graph_of(wide, signature)(*inputs.values())
    assert torch.equal(got, want)


def test_what_the_export_does_not_carry_is_refused_on_exported_backends(folders: dict, tmp_path: Path) -> None:
    """The export is the plain transformer: a Flux Fill model (its masked-image inputs) and a Redux
    reference (its attention bias) are refused in one line on onnx / tensorrt, before any export."""
    from PIL import Image

    from difftool.core.errors import ParameterError

    fill = tiny.save_folder(tiny.flux_fill(), tmp_path / "fill")
    image = Image.new("RGB", (32, 32), (90, 120, 150))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    with pytest.raises(ParameterError, match="does not run a Flux Fill model"):
        api.run("inpaint", tmp_path / "in.png", model=str(fill), backend="onnx", mask=str(tmp_path / "mask.png"),
                prompt="a kite", steps=2)  # fmt: skip
    with pytest.raises(ParameterError, match="--reference.*torch"):
        api.run("generate", model=str(folders["flux"]), backend="onnx", reference=[str(tmp_path / "in.png")],
                **COMMON)  # fmt: skip
