"""A1111 ``/sdapi/v1`` with a Flux model: Forge's ``distilled_cfg_scale`` and sampler / schedule names."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import difftool
from difftool.plugins.registry import Registry

pytest.importorskip("fastapi")


def _flow_tiny() -> Any:
    """tests/plugins/builtin/flow/tiny.py (tiny random SD3 / Flux builders), loaded by path."""
    path = Path(__file__).resolve().parents[1] / "plugins" / "builtin" / "flow" / "tiny.py"
    spec = importlib.util.spec_from_file_location("_serve_tests_flow_tiny", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_flux_txt2img_and_img2img_take_forge_fields(
    make_client: Any, serve_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _flow_tiny().save_folder(_flow_tiny().flux(seed=0), tmp_path / "models" / "tiny-flux")
    monkeypatch.setenv("DIFFTOOL_MODELS", str(model.parent))
    client = make_client()
    assert "tiny-flux" in [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert {"Simple", "Beta"} <= {s["label"] for s in client.get("/sdapi/v1/schedulers").json()}
    run = {"prompt": "a fox", "negative_prompt": "fog", "seed": 3, "steps": 2, "width": 32, "height": 32}
    # Forge: cfg_scale 2 is Flux's true CFG, distilled_cfg_scale its guidance; "Euler" + "Simple" its Euler.
    body = {**run, "cfg_scale": 2.0, "distilled_cfg_scale": 3.5, "sampler_name": "Euler", "scheduler": "Simple",
            "override_settings": {"sd_model_checkpoint": "tiny-flux"}}  # fmt: skip
    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    expected = difftool.run("generate", model=str(model), guidance_scale=3.5, true_cfg=2.0, scheduler="flow-euler",
                            registry=serve_registry, **run)  # fmt: skip
    assert np.array_equal(np.asarray(decode(answer.json()["images"][0])), np.asarray(expected.image))
    infotext = json.loads(answer.json()["info"])["infotexts"][0]
    assert "CFG scale: 2.0, Distilled CFG Scale: 3.5, Shift: " in infotext
    # img2img (style) with "DPM++ 2M": its flow variant; an A1111 client's cfg_scale alone is the guidance.
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    init = base64.b64encode(buffer.getvalue()).decode("ascii")
    body = {**run, "cfg_scale": 3.5, "sampler_name": "DPM++ 2M", "init_images": [init], "denoising_strength": 0.8,
            "override_settings": {"sd_model_checkpoint": "tiny-flux"}}  # fmt: skip
    answer = client.post("/sdapi/v1/img2img", json=body)
    assert answer.status_code == 200, answer.text
    style = {k: v for k, v in run.items() if k not in ("width", "height")}
    expected = difftool.run("style", picture, model=str(model), guidance_scale=3.5, strength=0.8,
                            scheduler="flow-dpmpp-2m", registry=serve_registry, **style)  # fmt: skip
    assert np.array_equal(np.asarray(decode(answer.json()["images"][0])), np.asarray(expected.image))
    assert json.loads(answer.json()["info"])["sampler_name"] == "DPM++ 2M (flow)"
