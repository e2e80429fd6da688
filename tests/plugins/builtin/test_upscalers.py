"""Community upscalers through spandrel: random-weight instances of spandrel's own architecture classes,
saved as .pth and .safetensors, run by difftool's superres task and compared with spandrel's forward."""

from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from difftool.app import api
from difftool.core.errors import ModelError, ParameterError
from difftool.plugins.builtin import upscalers

spandrel = upscalers.import_spandrel()  # CI installs spandrel (without torchvision): this must not skip


def esrgan_new_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """spandrel's RRDBNet keys (the original ESRGAN layout) in BasicSR / Real-ESRGAN's newer layout."""
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k)))
    uppers = sorted({int(k.split(".")[1]) for k in state if k.startswith("model.")} - {0, 1})
    up_convs, hr, last = uppers[:-2], uppers[-2], uppers[-1]
    new = {}
    for key, value in state.items():
        if m := re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
            new[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = value
        elif m := re.match(rf"model\.1\.sub\.{blocks}\.(weight|bias)", key):
            new[f"conv_body.{m.group(1)}"] = value
        else:
            index, kind = int(key.split(".")[1]), key.split(".")[-1]
            name = {0: "conv_first", hr: "conv_hr", last: "conv_last"}.get(index)
            name = name or f"conv_up{up_convs.index(index) + 1}"
            new[f"{name}.{kind}"] = value
    return new


def build(kind: str) -> tuple[dict[str, torch.Tensor], int]:
    """A random-weight network of spandrel's class for ``kind``: its state dict and scale."""
    from spandrel.architectures.Compact import Compact as SRVGGNetCompact
    from spandrel.architectures.DAT import DAT
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.HAT import HAT
    from spandrel.architectures.SPAN import SPAN
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(len(kind))
    if kind == "esrgan-1x":  # a restoration model (denoise, dejpeg): same size out
        net, scale = ESRGAN(num_filters=8, num_blocks=1, scale=1), 1
    elif kind.startswith("esrgan"):
        net, scale = ESRGAN(num_filters=8, num_blocks=1, scale=4), 4
    elif kind == "compact":
        net, scale = SRVGGNetCompact(num_feat=8, num_conv=2, upscale=4), 4
    elif kind == "swinir":
        net = SwinIR(
            upscale=2,
            img_size=16,
            window_size=4,
            embed_dim=12,
            depths=[2],
            num_heads=[2],
            mlp_ratio=2,
            upsampler="pixelshuffle",
            resi_connection="1conv",
        )
        scale = 2
    elif kind == "dat":
        net = DAT(upscale=2, img_size=16, embed_dim=32, depth=[2], num_heads=[2], split_size=[2, 4], expansion_factor=2)
        scale = 2
    elif kind == "hat":
        # squeeze_factor is not in the weights: spandrel assumes HAT's default, 30 (so embed_dim >= 30)
        net = HAT(upscale=2, img_size=16, embed_dim=30, depths=[2], num_heads=[2], window_size=4, compress_ratio=3,
                  squeeze_factor=30, mlp_ratio=2, upsampler="pixelshuffle", resi_connection="1conv")  # fmt: skip
        scale = 2
    else:
        net, scale = SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2), 2
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    return (esrgan_new_layout(state) if kind == "esrgan-new" else state), scale


KINDS = ["esrgan-old", "esrgan-new", "esrgan-1x", "compact", "swinir", "span", "dat", "hat"]
#: Window attention depends on where windows fall: these run as one tile when compared with spandrel.
WINDOWED = ("swinir", "dat", "hat")


@pytest.fixture(scope="module")
def photo_rgb() -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:52]
    base = np.stack([xx * 4, yy * 5, (xx * yy) % 200], axis=2) + rng.integers(0, 40, (40, 52, 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def direct_forward(state: dict[str, torch.Tensor], image: Image.Image) -> np.ndarray:
    descriptor = spandrel.ModelLoader().load_from_state_dict(spandrel.canonicalize_state_dict(dict(state)))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.inference_mode():
        return (descriptor.model.eval()(x)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_difftool_matches_spandrels_forward(kind: str, suffix: str, photo_rgb, tmp_path: Path, registry) -> None:
    state, scale = build(kind)
    path = tmp_path / f"{scale}x-{kind}{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, path)
    expected = direct_forward(state, photo_rgb)
    # Window attention depends on where windows fall: one tile. The CNNs run in 3 x 4 tiles.
    tile = {"tile": 512} if kind in WINDOWED else {"tile": max(32, 24 * scale), "overlap": 8 * scale}
    result = api.run("superres", photo_rgb, model=str(path), seed=0, dtype="fp32", registry=registry, **tile)
    got = np.asarray(result.image)
    assert got.shape == expected.shape == (40 * scale, 52 * scale, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # within 1/255
    record = result.record
    assert record["scale"] == scale and record["model"] == path.stem and len(record["model_hash"]) == 10
    assert record["architecture"] and record["precision"] == "float32"


def test_scale_comes_from_the_model_and_a_different_one_is_refused(photo_rgb, tmp_path: Path, registry) -> None:
    state, _ = build("compact")
    path = tmp_path / "4x-compact.safetensors"
    save_file(state, path)
    with pytest.raises(ParameterError, match="is a 4x .* --scale 2 differs"):
        api.run("superres", photo_rgb, model=str(path), scale="2", registry=registry)
    assert api.run("superres", photo_rgb, model=str(path), scale="4", registry=registry).image.size == (208, 160)


def test_bf16_runs_where_the_architecture_supports_it(photo_rgb, tmp_path: Path, registry) -> None:
    state, _ = build("compact")
    path = tmp_path / "4x-compact.safetensors"
    save_file(state, path)
    fp32 = api.run("superres", photo_rgb, model=str(path), dtype="fp32", registry=registry)
    bf16 = api.run("superres", photo_rgb, model=str(path), dtype="bf16", registry=registry)
    assert bf16.record["precision"] == "bfloat16"
    diff = np.abs(np.asarray(fp32.image, dtype=int) - np.asarray(bf16.image, dtype=int))
    assert diff.mean() < 3
    again = api.run("superres", photo_rgb, model=str(path), dtype="fp32", registry=registry)
    assert np.array_equal(np.asarray(again.image), np.asarray(fp32.image))  # the cached weights were not rounded


def test_alpha_and_16_bit_gray_are_kept(tmp_path: Path, registry) -> None:
    state, _ = build("span")
    path = tmp_path / "2x-span.pth"
    torch.save(state, path)
    rgba = np.dstack([np.full((10, 12, 3), 120, np.uint8), np.tile(np.linspace(0, 255, 12, dtype=np.uint8), (10, 1))])
    out = api.run("superres", Image.fromarray(rgba, "RGBA"), model=str(path), registry=registry).image
    assert out.mode == "RGBA" and out.size == (24, 20)
    gray = Image.fromarray(np.full((10, 12), 30000, np.uint16))
    kept = api.run("superres", gray, model=str(path), keep_mode=True, registry=registry).image
    assert kept.mode.startswith("I;16") and kept.size == (24, 20)


def test_a_pickle_that_runs_code_is_refused_with_nothing_executed(photo_rgb, tmp_path: Path, registry) -> None:
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "4x-evil.pth"
    path.write_bytes(pickle.dumps({"params_ema": Evil()}))
    with pytest.raises(ModelError, match="cannot be loaded safely"):
        api.run("superres", photo_rgb, model=str(path), registry=registry)
    assert not marker.exists()


def test_unknown_architecture_names_what_was_found(photo_rgb, tmp_path: Path, registry) -> None:
    path = tmp_path / "mystery.safetensors"
    save_file({"encoder.layer.weight": torch.zeros(4, 4), "decoder.bias": torch.zeros(4)}, path)
    with pytest.raises(
        ModelError, match=r"no supported upscaler architecture .*2 tensors: decoder.bias, encoder.layer"
    ):
        api.run("superres", photo_rgb, model=str(path), registry=registry)


def test_upscaler_folders_are_listed_and_selectable_by_name(photo_rgb, tmp_path, monkeypatch, registry) -> None:
    for sub in ("ESRGAN", "upscale_models", "models/ESRGAN"):
        (tmp_path / sub).mkdir(parents=True)
    state, _ = build("compact")
    save_file(state, tmp_path / "upscale_models" / "4x-Tiny.safetensors")
    torch.save(build("span")[0], tmp_path / "models" / "ESRGAN" / "2x-Span.pth")
    monkeypatch.setenv("DIFFTOOL_MODELS", str(tmp_path))
    found = {m.name: m.family for m in registry.find_models()}
    assert found["4x-Tiny"] == found["2x-Span"] == "upscaler"
    assert api.run("superres", photo_rgb, model="4x-Tiny", registry=registry).image.size == (208, 160)
    assert api.run("superres", photo_rgb, model="2x-Span", registry=registry).record["scale"] == 2


def test_cancel_between_tiles(photo_rgb, tmp_path: Path, registry) -> None:
    from difftool.core.errors import Cancelled
    from difftool.core.task import CancelToken

    state, _ = build("compact")
    path = tmp_path / "4x-compact.safetensors"
    save_file(state, path)
    token, seen = CancelToken(), []

    def progress(step: int, total: int, preview) -> None:
        seen.append((step, total))
        token.cancel()

    with pytest.raises(Cancelled):
        api.run(
            "superres",
            photo_rgb,
            model=str(path),
            tile=64,
            overlap=16,
            progress=progress,
            cancel=token,
            registry=registry,
        )
    assert seen == [(1, seen[0][1])] and seen[0][1] > 1


def test_spandrel_imports_without_torchvision_and_leaves_no_stand_in() -> None:
    assert "spandrel" in sys.modules
    # The stand-in was only lent during spandrel's import: nothing else can mistake it for torchvision.
    module = sys.modules.get("torchvision")
    assert module is None or getattr(module, "__file__", None) is not None


def test_an_architecture_not_yet_exported_says_so(photo_rgb, tmp_path: Path, registry) -> None:
    path = tmp_path / "2x-hat.safetensors"
    save_file(build("hat")[0], path)
    with pytest.raises(ModelError, match=r"\(HAT\) is not exported to ONNX by difftool yet"):
        api.run("superres", photo_rgb, model=str(path), backend="onnx", registry=registry)


@pytest.mark.parametrize("kind", ["swinir", "dat"])
def test_window_attention_exports_at_a_fixed_tile_and_matches_torch(kind, tmp_path, monkeypatch, registry) -> None:
    """A window-attention graph keeps the attention mask of the size it was exported at: one export at 64 px,
    and full-size tiles."""
    pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")
    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    state, scale = build(kind)
    path = tmp_path / f"{scale}x-{kind}.safetensors"
    save_file(state, path)
    rng = np.random.default_rng(3)
    large = Image.fromarray(rng.integers(0, 255, (90, 100, 3), dtype=np.uint8))
    kwargs = {"model": str(path), "dtype": "fp32", "registry": registry, "tile": 64 * scale, "overlap": 16 * scale}
    torch_out = api.run("superres", large, **kwargs)  # the same 64 px tiles as the export takes
    onnx_out = api.run("superres", large, backend="onnx", **kwargs)
    diff = np.abs(np.asarray(torch_out.image, dtype=int) - np.asarray(onnx_out.image, dtype=int))
    assert diff.max() <= 1 and onnx_out.image.size == (200, 180)
    [manifest] = list((tmp_path / "cache").rglob("manifest.json"))
    assert "-64px-" in manifest.parent.name
    small = Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8))  # under one tile: padded to it
    assert api.run("superres", small, backend="onnx", **kwargs).image.size == (104, 80)


@pytest.mark.parametrize("kind", ["compact", "esrgan-new", "span"])
def test_onnx_backend_exports_validates_and_matches_torch(kind: str, photo_rgb, tmp_path, monkeypatch, registry):
    pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")
    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    state, scale = build(kind)
    path = tmp_path / f"{scale}x-{kind}.safetensors"
    save_file(state, path)
    kwargs = {"model": str(path), "dtype": "fp32", "registry": registry, "tile": 24 * scale, "overlap": 8 * scale}
    torch_out = api.run("superres", photo_rgb, **kwargs)
    onnx_out = api.run("superres", photo_rgb, backend="onnx", **kwargs)
    assert onnx_out.record["backend"] == "onnx" and onnx_out.record["precision"] == "float32"
    diff = np.abs(np.asarray(torch_out.image, dtype=int) - np.asarray(onnx_out.image, dtype=int))
    assert diff.max() <= 1
    manifests = list((tmp_path / "cache").rglob("manifest.json"))
    assert len(manifests) == 1 and "max_relative_error" in manifests[0].read_text()
