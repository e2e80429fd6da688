"""ONNX exports of a ControlNet and of a U-Net taking its residuals, validated against PyTorch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from difftool.exporters import onnx_controlnet as oc
from difftool.runtimes.tensorrt.profiles import controlnet_profiles

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "builtin"))
from sd import tiny  # noqa: E402

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module", params=[False, True], ids=["sd1", "sdxl"])
def pair(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    parts = tiny.components(xl=request.param, vae_levels=4, seed=21)
    return parts["unet"], tiny.controlnet(parts["unet"], seed=22)


def test_the_declared_residuals_are_the_controlnets_outputs(pair: tuple[Any, Any]) -> None:
    unet, net = pair
    signature = oc.ControlNetSignature.of(net)
    inputs = oc.controlnet_inputs(signature, 2, 3, 5)
    with torch.no_grad():
        outputs = oc._ControlNetGraph(net)(*inputs)
    m = signature.unet.multiple
    assert [tuple(t.shape) for t in outputs] == signature.residuals.shapes(2, 3 * m, 5 * m)
    assert oc.Residuals.of(unet.config) == signature.residuals
    controlnet, unet_profile = controlnet_profiles(signature, (1, 2, 2), (4, 24, 40))
    request = {"controlnet_cond": tuple(inputs[3].shape), "sample": tuple(inputs[0].shape)}
    assert controlnet.covers(request)
    assert unet_profile.covers(dict(zip(signature.residuals.names, [tuple(t.shape) for t in outputs], strict=True)))


@pytest.mark.slow
def test_exports_validate_and_chain_like_pytorch(pair: tuple[Any, Any], tmp_path: Path) -> None:
    import onnxruntime as ort

    unet, net = pair
    report = oc.export_and_validate(net, unet, tmp_path)
    assert report["controlnet"]["max_relative_error"] < 1e-4
    assert report["unet_residuals"]["max_relative_error"] < 1e-4
    # One ControlNet step through both graphs, the weight applied to the residuals between them, equals
    # the U-Net called with diffusers' ControlNet at that conditioning scale.
    signature = oc.ControlNetSignature.of(net)
    inputs = oc.controlnet_inputs(signature, 2, 4, 3, seed=5)
    feeds = dict(zip(signature.input_names(), [t.numpy() for t in inputs], strict=True))
    residuals = ort.InferenceSession(str(tmp_path / "controlnet.onnx")).run(None, feeds)
    unet_session = ort.InferenceSession(str(tmp_path / "unet_residuals.onnx"))
    unet_feeds = {k: v for k, v in feeds.items() if k != "controlnet_cond"}
    unet_feeds |= {name: r * 0.7 for name, r in zip(signature.residuals.names, residuals, strict=True)}
    actual = unet_session.run(None, unet_feeds)[0]
    sample, timestep, text, image, *added = inputs
    kwargs = {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if added else {}
    with torch.no_grad():
        down, mid = net(sample, timestep, text, image, conditioning_scale=0.7, return_dict=False, **kwargs)
        expected = unet(
            sample, timestep, text, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kwargs
        ).sample.numpy()
    assert np.abs(actual - expected).max() / np.abs(expected).max() < 1e-4
