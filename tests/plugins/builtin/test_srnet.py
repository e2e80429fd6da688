"""SRNet, the superres network, and model folders with one variant per scale."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.app import api
from difftool.core.errors import ModelError
from difftool.plugins.builtin.pixel_model import load_pixel_model
from difftool.plugins.builtin.srnet import SRNet


def test_srnet_works_at_the_low_resolution_and_any_multiple_of_its_scale() -> None:
    torch.manual_seed(0)
    net = SRNet(scale=4, channels=8, blocks=2, embed_dim=16).eval()
    sample = torch.randn(2, 6, 36, 20)
    out = net(sample, torch.tensor([10.0, 900.0])).sample
    assert out.shape == (2, 3, 36, 20)
    seen = []
    net.head.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    net(sample, torch.tensor(5.0))  # one timestep for the whole batch works too
    assert seen == [torch.Size([2, 8, 9, 5])]  # the body runs at 1/4 of the output size
    assert net.multiple == 4


def test_timestep_modulates_the_features() -> None:
    torch.manual_seed(0)
    net = SRNet(scale=2, channels=8, blocks=2, embed_dim=16).eval()
    torch.nn.init.normal_(net.film.weight, std=0.5)
    sample = torch.randn(1, 6, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(net(sample, torch.tensor(10.0)).sample, net(sample, torch.tensor(990.0)).sample)


def test_each_scale_runs_its_own_variant(srnet_model: Path, registry) -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (10, 14, 3), dtype=np.uint8))
    results = {
        s: api.run("superres", image, model=str(srnet_model), scale=str(s), seed=1, registry=registry, dtype="fp32")
        for s in (2, 4)
    }
    assert results[2].image.size == (28, 20) and results[4].image.size == (56, 40)
    hashes = {s: r.record["model_hash"] for s, r in results.items()}
    assert hashes[2] != hashes[4]
    assert load_pixel_model(srnet_model, "superres", "2").sha256.startswith(hashes[2])
    assert load_pixel_model(srnet_model, "superres").meta["scales"] == [4]  # the default variant


def test_missing_or_escaping_variants_are_model_errors(srnet_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="has no variant 3 .it has 2, 4"):
        load_pixel_model(srnet_model, "superres", "3")
    escaping = tmp_path / "escaping"
    shutil.copytree(srnet_model, escaping)
    meta = json.loads((escaping / "difftool.json").read_text())
    meta["variants"]["2"] = "../../elsewhere"
    (escaping / "difftool.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="points outside the model folder"):
        load_pixel_model(escaping, "superres", "2")


def test_an_unknown_network_class_is_named(srnet_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    shutil.copytree(srnet_model / "x2", folder)
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = "Evil"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="network class 'Evil' is not a difftool pixel model"):
        load_pixel_model(folder, "superres")


def test_malformed_variants_and_the_default_variant(srnet_model: Path, tmp_path: Path, registry) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(srnet_model, broken)
    meta = json.loads((broken / "difftool.json").read_text())
    (broken / "difftool.json").write_text(json.dumps({**meta, "variants": {"2": 2}}))
    with pytest.raises(ModelError, match="'variants' must map names to sub-folders"):
        load_pixel_model(broken, "superres", "2")
    only_two = tmp_path / "only-two"
    shutil.copytree(srnet_model, only_two)
    (only_two / "difftool.json").write_text(
        json.dumps({**meta, "scales": [2], "variants": {"2": "x2"}, "default_variant": "2"})
    )
    image = Image.new("RGB", (10, 8), (40, 90, 200))
    result = api.run("superres", image, model=str(only_two), registry=registry, dtype="fp32")  # no --scale
    assert result.record["scale"] == 2 and result.image.size == (20, 16)
