"""Shared fixtures: tiny random-weight models in the real folder layout, a fresh registry, no network."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DIFFTOOL_NO_PLUGINS", "1")  # tests pass plugins explicitly


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (the README's ``-n 2``) each worker computes on one thread: two workers on two
    cores instead of four threads fighting over them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        raise AssertionError(f"a test tried to connect to {address!r}; difftool must work offline")

    monkeypatch.setattr(socket.socket, "connect", guarded)


def make_pixel_model(path: Path, task: str, prediction_type: str = "sample", target: str = "residual") -> Path:
    import torch
    from diffusers import UNet2DModel

    from difftool.plugins.builtin.pixel_model import save_pixel_model

    torch.manual_seed(0)
    in_channels = 6 if task == "superres" else 7
    unet = UNet2DModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    meta = {"task": task, "target": target if task == "superres" else "image", "steps": 3, "scheduler": "ddim"}
    if task == "superres":
        meta["scales"] = [2, 4]
    schedule = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": prediction_type}
    return save_pixel_model(unet, path, meta, schedule, fp16=False)


def make_srnet_model(path: Path, scales: tuple[int, ...] = (2, 4)) -> Path:
    """A tiny SRNet superres model folder with one variant per scale (the embedded model's layout)."""
    import json

    import torch

    from difftool.plugins.builtin.pixel_model import META_FILE, save_pixel_model
    from difftool.plugins.builtin.srnet import SRNet

    path.mkdir(parents=True)
    schedule = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"}
    for scale in scales:
        torch.manual_seed(scale)
        net = SRNet(scale=scale, channels=8, blocks=2, embed_dim=16)
        for param in net.parameters():  # FiLM starts at zero; random everywhere so every input matters
            torch.nn.init.normal_(param, std=0.1)
        meta = {"task": "superres", "target": "residual", "steps": 2, "scheduler": "ddim", "scales": [scale]}
        save_pixel_model(net, path / f"x{scale}", meta, schedule, fp16=False)
    top = {
        "task": "superres",
        "name": "tiny-srnet",
        "scales": list(scales),
        "variants": {str(s): f"x{s}" for s in scales},
        "default_variant": str(scales[-1]),
    }
    (path / META_FILE).write_text(json.dumps(top))
    return path


def make_inpaintnet_model(path: Path) -> Path:
    """A tiny InpaintNet inpaint model folder (the embedded model's network and layout)."""
    import torch

    from difftool.plugins.builtin.inpaintnet import InpaintNet
    from difftool.plugins.builtin.pixel_model import save_pixel_model

    torch.manual_seed(7)
    net = InpaintNet(channels=8, fine_channels=8, dilations=(1, 2), embed_dim=16)
    for param in net.parameters():  # FiLM and the tail start at zero; random everywhere so every input matters
        torch.nn.init.normal_(param, std=0.1)
    meta = {"task": "inpaint", "name": "tiny-inpaintnet", "target": "image", "steps": 2, "scheduler": "ddim"}
    meta["fill"] = "noise"
    schedule = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"}
    return save_pixel_model(net, path, meta, schedule, fp16=False)


@pytest.fixture(scope="session")
def inpaintnet_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inpaintnet_model(tmp_path_factory.mktemp("models") / "tiny-inpaintnet")


@pytest.fixture(scope="session")
def srnet_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_srnet_model(tmp_path_factory.mktemp("models") / "tiny-srnet")


@pytest.fixture(scope="session")
def superres_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pixel_model(tmp_path_factory.mktemp("models") / "tiny-superres", "superres")


@pytest.fixture(scope="session")
def inpaint_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pixel_model(tmp_path_factory.mktemp("models") / "tiny-inpaint", "inpaint")


@pytest.fixture
def registry():
    from difftool.plugins.registry import build_registry

    return build_registry(entry_points=False)


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A small textured RGB PNG."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:20, 0:28]
    rgb = np.stack([xx * 9, yy * 12, (xx * yy) % 255], axis=2).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture(scope="session")
def embedded_superres() -> Path:
    from difftool.plugins.builtin.pixel_model import embedded_model_path

    path = embedded_model_path("superres")
    assert path is not None, "the package must ship difftool/models/superres"
    return path


@pytest.fixture(scope="session")
def embedded_inpaint() -> Path:
    from difftool.plugins.builtin.pixel_model import embedded_model_path

    path = embedded_model_path("inpaint")
    assert path is not None, "the package must ship difftool/models/inpaint"
    return path
