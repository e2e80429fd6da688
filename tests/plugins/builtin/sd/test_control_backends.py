"""ControlNet on the ``onnx`` and ``tensorrt`` backends: the same images as PyTorch's, from cached,
validated exports (TensorRT through the stand-ins of :mod:`difftool.testing.gpu`, no GPU here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from difftool.app import api
from difftool.core.errors import ParameterError

from . import tiny
from .test_parity import max_diff, photo

pytest.importorskip("onnxruntime")

SIZE = (80, 64)  # latents of 10 x 8: both sides inside the engines' declared range (from 8)
#: Measured on these models: onnx (and TensorRT's stand-in, the same graphs) vs torch differ by at most
#: 1/255, PSNR 87 dB for SD 1.x; SDXL identical 8-bit images. Uncontrolled images are 55-78/255 away.
MAX_DIFF, MIN_PSNR = 1, 60.0


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny SD 1.x folder, two ControlNets (an original-layout file, a diffusers folder) and an image."""
    root = tmp_path_factory.mktemp("cnb")
    parts = tiny.components(vae_levels=4, seed=31)
    nets = [tiny.controlnet(parts["unet"], seed=32), tiny.controlnet(parts["unet"], seed=33)]
    nets[1].save_pretrained(root / "cn-folder", safe_serialization=True)
    photo((80, 60)).save(root / "control.png")
    return {
        "folder": tiny.save_folder(parts, root / "tiny-sd"),
        "nets": nets,
        "files": [tiny.save_controlnet_file(nets[0], root / "cn-original.safetensors"), root / "cn-folder"],
        "image": root / "control.png",
    }


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def units(sd: dict[str, Any]) -> list[str]:
    """Two units: a weighted one over the first steps, and one in guess mode from a quarter on."""
    return [f"{sd['files'][0]}={sd['image']},weight=0.8,end=0.7", f"{sd['files'][1]}={sd['image']},guess=1,start=0.25"]


def generate(sd: dict[str, Any], control: list[str], **options: Any) -> Any:
    params = dict(prompt="a lighthouse", negative_prompt="fog", steps=4, guidance_scale=6.0, seed=3, dtype="fp32")
    return api.run("generate", model=str(sd["folder"]), width=SIZE[0], height=SIZE[1], scheduler="ddim",
                   control=control, **{**params, **options})  # fmt: skip


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = (np.asarray(i, np.float64) / 255 for i in (a, b))
    return float(10 * np.log10(1.0 / max(np.mean((x - y) ** 2), 1e-12)))


def manifests(cache: Path, kind: str) -> dict[str, dict[str, Any]]:
    return {p.parent.name: json.loads(p.read_text()) for p in (cache / kind).glob("*/manifest.json")}


def test_onnx_control_matches_torch_from_validated_cached_exports(sd: dict[str, Any], cache: Path) -> None:
    torch_run = generate(sd, units(sd))
    onnx_run = generate(sd, units(sd), backend="onnx")
    plain = generate(sd, [], backend="onnx")
    a, b = torch_run.images[0], onnx_run.images[0]
    assert max_diff(a, b) <= MAX_DIFF and psnr(a, b) > MIN_PSNR, (max_diff(a, b), psnr(a, b))
    assert max_diff(b, plain.images[0]) > 5  # the ControlNets changed the ONNX image
    assert onnx_run.record["control"] == torch_run.record["control"]
    found = manifests(cache, "onnx")
    graphs = sorted(m["components"]["graph"] for m in found.values() if "graph" in m["components"])
    assert graphs == ["controlnet", "controlnet", "unet-residuals"]
    for manifest in found.values():
        assert manifest["validation"]["max_relative_error"] < 1e-4
    # A second run reuses every export: the same entries, nothing rebuilt.
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("onnx/*/model.onnx")}
    again = generate(sd, units(sd), backend="onnx")
    assert {p: p.stat().st_mtime_ns for p in cache.glob("onnx/*/model.onnx")} == stamps
    assert max_diff(again.images[0], b) == 0


@pytest.mark.slow
def test_onnx_control_matches_torch_on_sdxl(tmp_path: Path, cache: Path) -> None:
    """SDXL's added conditions (text_embeds, time_ids) reach the exported ControlNet and U-Net."""
    parts = tiny.components(xl=True, vae_levels=4, seed=34)
    tiny.controlnet(parts["unet"], seed=35).save_pretrained(tmp_path / "cn-xl", safe_serialization=True)
    photo((80, 60)).save(tmp_path / "control.png")
    xl = {"folder": tiny.save_folder(parts, tmp_path / "xl")}
    control = [f"{tmp_path / 'cn-xl'}={tmp_path / 'control.png'},weight=0.9,guess=1"]
    a, b = (generate(xl, control, **options).images[0] for options in ({}, {"backend": "onnx"}))
    assert max_diff(a, b) <= MAX_DIFF and psnr(a, b) > MIN_PSNR, (max_diff(a, b), psnr(a, b))
    assert max_diff(b, generate(xl, [], backend="onnx").images[0]) > 5


def test_controlnet_exports_are_keyed_by_their_weights(sd: dict[str, Any], cache: Path) -> None:
    from difftool.exporters.onnx_controlnet import cached_controlnet

    net = sd["nets"][0]
    first, _ = cached_controlnet(net, "aaaa")
    assert cached_controlnet(net, "aaaa")[0].path == first.path
    other, _ = cached_controlnet(net, "bbbb")
    assert other.manifest["key"] != first.manifest["key"] and first.path.is_dir()  # both kept: other names
    assert not list(cache.glob("onnx/.*-*.*/"))  # no temp folder left behind


def test_tensorrt_control_builds_engines_with_the_declared_profiles_and_binds_the_residuals(
    sd: dict[str, Any], cache: Path
) -> None:
    from difftool.exporters.onnx_controlnet import ControlNetSignature
    from difftool.plugins.builtin.sd.tasks import latent_shapes, prompt_tokens
    from difftool.runtimes.tensorrt.profiles import control_ranges, controlnet_profiles
    from difftool.testing.gpu import gpu_harness

    control = [f"{sd['files'][0]}={sd['image']},weight=0.8"]
    reference = generate(sd, control)
    with gpu_harness() as harness:
        result = generate(sd, control, backend="tensorrt", device="cuda")
    a, b = reference.images[0], result.images[0]
    assert max_diff(a, b) <= MAX_DIFF and psnr(a, b) > MIN_PSNR, (max_diff(a, b), psnr(a, b))
    assert max_diff(b, generate(sd, []).images[0]) > 5
    # Two engines: the ControlNet's and the residual U-Net's, each with controlnet_profiles' profile.
    shapes = latent_shapes(SIZE, 6.0, tokens=prompt_tokens("a lighthouse", "fog"))
    signature = ControlNetSignature.of(sd["nets"][0])
    expected = [p.as_json() for p in controlnet_profiles(signature, *control_ranges(shapes))]
    assert harness.trt.builds == 2
    built = sorted(({k: v for k, v in ps[0].items()} for ps in harness.trt.build_profiles), key=len)
    assert sorted(expected, key=len) == built
    # Every U-Net execution was fed the residuals; every ControlNet execution returned them.
    names = set(signature.residuals.names)
    unet_runs = [(i, o) for i, o in harness.trt.executed if o == ("out",)]
    controlnet_runs = [(i, o) for i, o in harness.trt.executed if "controlnet_cond" in i]
    assert len(unet_runs) == len(controlnet_runs) == 4  # one call per DDIM step, CFG batched
    assert all(names <= set(i) for i, _ in unet_runs)
    assert all(set(o) == names for _, o in controlnet_runs)


def test_tensorrt_11_control_asks_for_fp32(sd: dict[str, Any], cache: Path) -> None:
    """TensorRT 11 builds the graph's own precision, and the ControlNet exports are fp32: refused, not rounded."""
    from difftool.testing.gpu import gpu_harness

    control = [f"{sd['files'][0]}={sd['image']}"]
    with gpu_harness("11.1.0") as harness, pytest.raises(ParameterError, match="with --dtype fp32"):
        generate(sd, control, backend="tensorrt", device="cuda", dtype="fp16")
    assert harness.trt.builds == 0


def test_controlnet_is_refused_on_a_backend_that_cannot_run_it() -> None:
    from difftool.core.backend import ResolvedBackend
    from difftool.core.task import RunContext
    from difftool.plugins.builtin.backends import TritonBackend
    from difftool.plugins.builtin.sd.control import ControlUnit
    from difftool.plugins.builtin.sd.control_backend import ControlNetCapable, residual_denoiser
    from difftool.plugins.builtin.sd.controlled import load_units
    from difftool.plugins.registry import build_registry

    registry = build_registry(entry_points=False)
    context = RunContext(backend=ResolvedBackend(TritonBackend(), "cpu", "fp32"), registry=registry)
    with pytest.raises(ParameterError, match="ControlNet does not run on --backend triton") as caught:
        load_units([ControlUnit("cn")], model=None, context=context)
    assert "use --backend torch, onnx or tensorrt" in str(caught.value)
    with pytest.raises(ParameterError, match="ControlNet does not run on --backend triton"):
        residual_denoiser(context, object(), prediction_type="epsilon")
    assert not context.denoisers
    # The capability is the SD plugin's protocol, declared by the backends that run ControlNets; core's
    # backend interface names no model family.
    capable = {name for name, entry in registry.backends.items() if isinstance(entry.value, ControlNetCapable)}
    assert capable == {"torch", "onnx", "tensorrt"}
