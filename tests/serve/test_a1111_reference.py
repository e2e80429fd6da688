"""A1111's ControlNet IP-Adapter units (``module: ip-adapter_clip_sd15`` and an ip-adapter ``model``) are difftool's
reference parameters; the unit's inline image is decoded within the server's limits, never trusted."""

from __future__ import annotations

import base64
import importlib.util
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from serve_helpers import b64, png_bytes

import difftool
from difftool.plugins.registry import Registry


def _tiny_ipa() -> Any:
    """tests/plugins/builtin/sd/tiny_ipa.py, loaded by path (as the conftest loads tiny.py)."""
    path = Path(__file__).resolve().parents[1] / "plugins" / "builtin" / "sd" / "tiny_ipa.py"
    spec = importlib.util.spec_from_file_location("_serve_tests_sd_tiny_ipa", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ipa_root(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model root (ComfyUI's layout) with an IP-Adapter for ``tiny-sd`` and a CLIP vision encoder."""
    from diffusers import UNet2DConditionModel

    tiny_ipa = _tiny_ipa()
    root = tmp_path_factory.mktemp("ipa-models")
    unet = UNet2DConditionModel.from_pretrained(model_root / "tiny-sd" / "unet")
    tiny_ipa.save_adapter(tiny_ipa.adapter(unet, seed=3), root / "models" / "ipadapter" / "ip-adapter_tiny.safetensors")
    tiny_ipa.save_encoder_file(tiny_ipa.image_encoder(seed=4), root / "models" / "clip_vision" / "tiny-vit.safetensors")
    Image.fromarray(np.asarray(Image.open(io.BytesIO(png_bytes(40, 30, seed=5))))).save(root / "reference.png")
    return root


@pytest.fixture
def client(make_client: Any, model_root: Path, ipa_root: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("DIFFTOOL_MODELS", f"{model_root}{os.pathsep}{ipa_root}")
    return make_client(default_model="tiny-sd", max_pixels=64 * 64)


def _txt2img(client: Any, unit: dict[str, Any], **extra: Any) -> Any:
    body = {"prompt": "a house", "negative_prompt": "fog", "seed": 4, "steps": 3, "width": 32, "height": 24,
            "cfg_scale": 6.0, "sampler_name": "Euler a", **extra}  # fmt: skip
    body["alwayson_scripts"] = {"ControlNet": {"args": [unit]}}
    return client.post("/sdapi/v1/txt2img", json=body)


def _unit(ipa_root: Path, **fields: Any) -> dict[str, Any]:
    image = b64((ipa_root / "reference.png").read_bytes())
    return {"module": "ip-adapter_clip_sd15", "model": "ip-adapter_tiny [6a3f6166]", "image": image, **fields}


def test_an_ip_adapter_unit_is_difftools_reference(client: Any, ipa_root: Path, serve_registry: Registry) -> None:
    response = _txt2img(client, _unit(ipa_root, weight=0.8))
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    common = dict(model="tiny-sd", prompt="a house", negative_prompt="fog", seed=4, steps=3, width=32, height=24,
                  guidance_scale=6.0, scheduler="euler-a", registry=serve_registry)  # fmt: skip
    expected = difftool.run(
        "generate", **common, reference=[ipa_root / "reference.png"], ip_adapter="ip-adapter_tiny", reference_weight=0.8
    )
    plain = difftool.run("generate", **common)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.image.convert("RGB")))
    assert not np.array_equal(np.asarray(image.convert("RGB")), np.asarray(plain.image.convert("RGB")))
    infotext = image.info["parameters"]
    assert 'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: ip-adapter_tiny [' in infotext
    assert "Weight: 0.8" in infotext and "<image>" in image.info["difftool"]  # no path of the server's


@pytest.mark.parametrize(
    ("fields", "status", "where"),
    [
        ({"module": "ip-adapter_face_id_plus"}, 422, "args[0].module"),
        ({"guidance_end": 0.5}, 422, "args[0].guidance_end"),
        ({"image": None}, 422, "args[0].image"),
        ({"model": "nope"}, 422, "args[0].model"),
        ({"model": "/etc/ip-adapter.safetensors"}, 422, "args[0].model"),  # no --allow-path: never a path
        ({"image": "%%%not base64%%%"}, 422, "reference image"),
        ({"image": b64(b"not an image at all")}, 422, "is not an image"),
        ({"image": b64(png_bytes(80, 80))}, 413, "over the limit"),  # over --max-pixels, refused from the header
        ({"weight": "heavy"}, 422, "args[0].weight"),
        ({"weight": 3.0}, 422, "reference-weight"),
    ],
)
def test_what_an_ip_adapter_unit_cannot_be_is_refused_in_one_line(
    client: Any, ipa_root: Path, fields: dict[str, Any], status: int, where: str
) -> None:
    response = _txt2img(client, _unit(ipa_root, **fields))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert where in error and "\n" not in error and str(ipa_root) not in error


def test_two_ip_adapter_units_are_refused(client: Any, ipa_root: Path) -> None:
    body_unit = _unit(ipa_root)
    response = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "x", "steps": 1, "width": 32, "height": 24,
              "alwayson_scripts": {"ControlNet": {"args": [body_unit, body_unit]}}},
    )  # fmt: skip
    assert response.status_code == 422 and "args[1].module: difftool applies one IP-Adapter unit" in response.text


def test_a_native_job_may_send_its_reference_inline_too(ipa_root: Path) -> None:
    from difftool.core.images import LoadedImage
    from difftool.plugins.builtin.sd.tasks import Style
    from difftool.serve.security import PathPolicy, check_params

    data = b64((ipa_root / "reference.png").read_bytes())
    checked = check_params(Style(), {"reference": [{"image": data}]}, None, PathPolicy(), max_pixels=64 * 64)
    (image,) = checked["reference"]
    assert isinstance(image, LoadedImage) and image.size == (40, 30)
    assert Style().param("reference").validate(checked["reference"]) == (image,)
