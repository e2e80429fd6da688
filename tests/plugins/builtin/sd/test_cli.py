"""``difftool run generate|style|inpaint`` with Stable Diffusion models saved by the test, offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from difftool import cli
from difftool.core.images import read_metadata
from difftool.plugins.registry import build_registry

from . import tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd-models")
    parts = tiny.components(seed=2)
    return {
        "folder": tiny.save_folder(parts, root / "tiny-folder"),
        "file": tiny.save_single_file(parts, root / "tiny-file.safetensors"),
        "inpaint": tiny.save_folder(tiny.components(in_channels=9, seed=4), root / "tiny-inpaint"),
    }


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch):
    registry = build_registry(entry_points=False)

    def invoke(*args: object):
        return CliRunner().invoke(cli.cli, ["run", *[str(a) for a in args]], obj=registry)

    return invoke


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_generate_writes_a1111_metadata(kind: str, models: dict, run, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run(
        "generate", "--model", models[kind], "--prompt", "a castle, at dusk", "--negative-prompt", "fog",
        "--width", 32, "--height", 24, "--steps", 2, "--seed", 7, "--batch-count", 2, "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.png"))
    assert (out / "report.jsonl").is_file()
    assert [f.name for f in files] == ["generate-7.png", "generate-8.png"]
    assert Image.open(files[0]).size == (32, 24)
    meta = read_metadata(files[0])
    params = meta["parameters"]
    assert params["prompt"] == "a castle, at dusk" and params["negative_prompt"] == "fog"
    assert params["Steps"] == "2" and params["Seed"] == "7" and params["Sampler"] == "DPM++ 2M Karras"
    assert params["CFG scale"] == "7.0" and params["Size"] == "32x24"
    assert params["Model"] == models[kind].name.removesuffix(".safetensors")
    assert len(params["Model hash"]) == 10
    assert meta["difftool"]["model_family"] == "sd1"
    assert not np.array_equal(np.asarray(Image.open(files[0])), np.asarray(Image.open(files[1])))


def test_style_keeps_the_input_size_and_alpha(models: dict, run, tmp_path: Path) -> None:
    source = tmp_path / "rgba.png"
    rgba = np.random.default_rng(3).integers(0, 255, (30, 45, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(source)
    out = tmp_path / "styled.png"
    result = run("style", source, "--model", models["folder"], "--style", "watercolor", "--steps", 3, "-o", out)
    assert result.exit_code == 0, result.output
    styled = Image.open(out)
    assert styled.size == (45, 30) and styled.mode == "RGBA"
    assert np.array_equal(np.asarray(styled)[..., 3], rgba[..., 3])
    assert "watercolor" in read_metadata(out)["parameters"]["prompt"]


@pytest.mark.parametrize("model", ["inpaint", "folder"])
def test_inpaint_and_outpaint(model: str, models: dict, run, picture: Path, tmp_path: Path) -> None:
    mask = tmp_path / "mask.png"
    hole = np.zeros((36, 44), np.uint8)
    hole[10:20, 12:30] = 255
    Image.fromarray(hole).save(mask)
    out = tmp_path / "painted.png"
    result = run("inpaint", picture, "--mask", mask, "--model", models[model], "--prompt", "a window", "--steps", 2,
                 "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    src, painted = np.asarray(Image.open(picture)), np.asarray(Image.open(out))
    assert np.array_equal(painted[hole == 0], src[hole == 0])
    assert not np.array_equal(painted[hole > 0], src[hole > 0])

    wide = tmp_path / "wide.png"
    result = run("inpaint", picture, "--extend", "8,16,0,4", "--model", models[model], "--steps", 2, "-o", wide)
    assert result.exit_code == 0, result.output
    grown = np.asarray(Image.open(wide))
    assert grown.shape == (40, 68, 3)
    assert np.array_equal(grown[0:36, 8:52], src)  # the original sits unchanged inside the new canvas

    crop = tmp_path / "crop.png"
    result = run("inpaint", picture, "--mask", mask, "--only-masked", "--context", 4, "--model", models[model],
                 "--steps", 2, "-o", crop)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(crop))[hole == 0], src[hole == 0])


def test_errors_are_one_line(models: dict, run, picture: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really")
    result = run("generate", "--model", ckpt, "--prompt", "x", "-o", tmp_path / "a.png")
    assert result.exit_code != 0
    assert "is a pickle file" in result.stderr and "--allow-pickle" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("generate", "--model", models["folder"], "--prompt", "x", "--width", 30, "-o", tmp_path / "b.png")
    assert result.exit_code == 2 and "multiple of 8" in result.stderr
    result = run("generate", "--prompt", "x", "-o", tmp_path / "c.png")
    assert result.exit_code != 0 and "--model" in result.stderr
    result = run("generate", "--model", models["inpaint"], "--prompt", "x", "-o", tmp_path / "d.png")
    assert result.exit_code != 0 and "inpainting model" in result.stderr
    assert not any((tmp_path / name).exists() for name in ("a.png", "b.png", "c.png", "d.png"))


def test_models_lists_families_and_names_resolve(models: dict, run, tmp_path: Path, monkeypatch) -> None:
    import shutil

    from difftool.plugins.builtin.sd.families import FAMILIES

    root = tmp_path / "ComfyUI"
    for sub in ("models/checkpoints", "models/loras", "models/vae"):
        (root / sub).mkdir(parents=True)
    shutil.copy(models["file"], root / "models/checkpoints/tiny-file.safetensors")
    sidecar = models["file"].with_name(models["file"].name + ".diffusers")
    shutil.copytree(sidecar, root / "models/checkpoints" / sidecar.name)
    shutil.copytree(models["folder"], root / "models/checkpoints/tiny-folder")
    shutil.copytree(models["inpaint"], root / "models/checkpoints/tiny-inpaint")
    from safetensors.torch import save_file

    from .test_loading import tiny as tiny_mod

    parts = tiny_mod.components()
    save_file(
        tiny_mod.ldm_vae_keys(parts["vae"].state_dict(), dict(parts["vae"].config)),
        str(root / "models/vae/v.safetensors"),
    )
    import torch

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(root / "models/loras/l.safetensors"))
    monkeypatch.setenv("DIFFTOOL_MODELS", str(root))
    listing = CliRunner().invoke(cli.cli, ["models"])
    assert listing.exit_code == 0, listing.output
    rows = {line.split()[0]: line.split()[1] for line in listing.output.splitlines() if line.strip()}
    # A tiny single file is recognised through its sidecar configs; full-size ones from the header.
    assert rows["tiny-file"] == "sd1" and rows["tiny-folder"] == "sd1" and rows["tiny-inpaint"] == "sd1-inpaint"
    assert rows["v"] == "vae" and rows["l"] == "lora"
    assert not any(name.endswith(".diffusers") for name in rows)
    assert set(FAMILIES) >= {rows["tiny-file"], rows["tiny-inpaint"]}
    out = tmp_path / "by-name.png"
    result = run("generate", "--model", "tiny-folder", "--prompt", "x", "--steps", 1, "--width", 16, "--height", 16,
                 "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output


def test_a_prompt_that_is_not_utf8_is_a_usage_error(models: dict, run, tmp_path: Path) -> None:
    """Issue 29 item 17: ``--prompt $'a \\xff'`` (a terminal in Latin-1) ended in a TypeError traceback."""
    prompt = b"a \xff tower".decode("utf-8", "surrogateescape")  # what Python makes of such an argv
    result = run("generate", "--model", models["folder"], "--prompt", prompt, "--steps", 1, "-o", tmp_path / "o.png")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "Error: a prompt holds bytes that are not UTF-8 text (at character 2); pass the prompt as UTF-8 "
        "(check the terminal's or the file's encoding)"
    ]
    assert not (tmp_path / "o.png").exists()
