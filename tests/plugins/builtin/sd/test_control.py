"""ControlNet units: parsing, preprocessors (built-in and a plugin's), discovery, errors, CLI, metadata."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from difftool import cli
from difftool.app import api
from difftool.core import metadata
from difftool.core.errors import ModelError, ParameterError, PluginError
from difftool.core.images import read_metadata
from difftool.core.task import Param
from difftool.plugins import hookimpl
from difftool.plugins.builtin.sd import preprocessors
from difftool.plugins.builtin.sd.control import CONTROL_PARAM, ControlUnit, format_unit, parse_unit
from difftool.plugins.registry import Registry, build_registry

from . import tiny
from .test_parity import photo


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root in A1111's layout: a tiny SD 1.x checkpoint folder and ControlNets in models/ControlNet."""
    root = tmp_path_factory.mktemp("models")
    parts = tiny.components(vae_levels=4, seed=11)
    tiny.save_folder(parts, root / "models" / "Stable-diffusion" / "tiny-sd")
    (root / "models" / "ControlNet").mkdir(parents=True)
    tiny.save_controlnet_file(tiny.controlnet(parts["unet"], seed=12), root / "models/ControlNet/cn-edges.safetensors")
    xl = tiny.components(xl=True, vae_levels=4, seed=13)
    xl_net = tiny.controlnet(xl["unet"], seed=14)
    xl_net.save_pretrained(root / "models" / "ControlNet" / "cn-xl", safe_serialization=True)
    photo((64, 48)).save(root / "edges.png")
    return root


@pytest.fixture
def models(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DIFFTOOL_MODELS", str(root))
    return root


def run(root: Path, control: Any, registry: Registry | None = None, **params: Any) -> Any:
    defaults = dict(prompt="a tower", steps=2, width=64, height=48, seed=1, dtype="fp32")
    model = str(root / "models" / "Stable-diffusion" / "tiny-sd")
    return api.run("generate", model=model, control=control, registry=registry, **{**defaults, **params})


# --- units -----------------------------------------------------------------------------------------


def test_a_unit_string_names_model_image_and_fields(tmp_path: Path) -> None:
    image = tmp_path / "e.png"
    photo().save(image)
    unit = parse_unit(f"canny-v11={image},pre=canny,weight=0.8,start=0.1,end=0.6,guess=yes,low=50")
    assert unit == ControlUnit("canny-v11", str(image), "canny", 0.8, 0.1, 0.6, True, (("low", "50"),))
    assert parse_unit(str(unit)) == unit  # its string form reads back
    assert parse_unit({"model": "m", "weight": 2}) == ControlUnit("m", weight=2.0)
    nested = parse_unit({"model": "m", "pre": "canny", "options": {"low": 20}, "high": 90})
    assert nested.options == (("high", "90"), ("low", "20"))


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("=x.png", "names no ControlNet model"),
        ("m,weight", "is not key=value"),
        ("m,weight=3", "weight 3 is outside [0, 2]"),
        ("m,start=0.5,end=0.5", "start 0.5 is not before end 0.5"),
        ("m,weight=much", "is not a number"),
    ],
)
def test_a_bad_unit_is_a_one_line_error_with_the_fix(spec: str, problem: str) -> None:
    with pytest.raises(ParameterError, match=re.escape(problem)) as error:
        parse_unit(spec)
    assert "\n" not in str(error.value) and error.value.fix


def test_a_unit_is_parsed_once_and_its_files_resolved_by_the_preflight(tmp_path: Path) -> None:
    """parse_unit reads syntax only (the server calls it on text it has not checked); the preflight's resolver
    then resolves the model and checks the image; the formatted unit still shows the names as written."""
    from difftool.app.plan import LocalResolver
    from difftool.core.models import ModelEntry

    cn = tmp_path / "cn.safetensors"
    cn.write_bytes(b"\0")
    unit = parse_unit(f"{cn}=missing.png,weight=0.5")
    assert unit.image == "missing.png" and parse_unit(format_unit(unit)) == unit
    resolver = LocalResolver(build_registry(entry_points=False))
    with pytest.raises(ParameterError, match="control image missing.png does not exist"):
        unit.resolved(resolver)
    (tmp_path / "edges.png").write_bytes(b"png")
    registry = build_registry(entry_points=False)
    registry.find_models = lambda: [ModelEntry("cn-edges", cn, "sd1-controlnet", "test")]  # type: ignore[method-assign]
    named = parse_unit(f"cn-edges={tmp_path / 'edges.png'},pre=canny,low=50").resolved(LocalResolver(registry))
    assert named.model.path == cn and named.image == tmp_path / "edges.png"
    assert format_unit(named) == f"cn-edges={tmp_path / 'edges.png'},pre=canny,weight=1,start=0,end=1,low=50"
    assert parse_unit(format_unit(named)) == parse_unit(f"cn-edges={tmp_path / 'edges.png'},pre=canny,low=50")


def test_a_multiple_param_takes_a_list_lines_or_one_value() -> None:
    assert CONTROL_PARAM.validate(None) == ()
    assert CONTROL_PARAM.validate("a,weight=0.5\n\nb") == (ControlUnit("a", weight=0.5), ControlUnit("b"))
    assert CONTROL_PARAM.validate(["a", {"model": "b"}]) == (ControlUnit("a"), ControlUnit("b"))
    assert Param("n", "int", multiple=True).validate(["1", 2]) == (1, 2)


# --- preprocessors ---------------------------------------------------------------------------------


def square(size: int = 32) -> np.ndarray:
    image = np.zeros((size, size, 3), np.float32)
    image[8:24, 8:24] = 1.0
    return image


def test_canny_matches_opencv_on_a_square() -> None:
    cv2 = pytest.importorskip("cv2")  # a benchmark dependency only; difftool's Canny needs none
    image = square()
    ours = preprocessors.canny(image, None)[..., 0] > 0.5
    theirs = cv2.Canny((image * 255).astype(np.uint8), 100, 200) > 0
    assert ours.sum() > 40
    assert (ours != theirs).mean() < 0.01


def test_canny_low_threshold_keeps_weak_edges_joined_to_strong_ones() -> None:
    image = square()
    image[8:24, 16:24] = 0.1  # the right half of the square is faint: its outer edges are weak
    strong_only = preprocessors.canny(image, None, low=150, high=200)[..., 0]
    joined = preprocessors.canny(image, None, low=60, high=200)[..., 0]
    assert joined.sum() > strong_only.sum()
    with pytest.raises(ParameterError, match="low threshold 200 is above high 100"):
        preprocessors.canny(image, None, low=200, high=100)


def test_scribble_makes_lines_white_whichever_way_they_were_drawn() -> None:
    page = np.ones((16, 16, 3), np.float32)
    page[8, :] = 0.0  # a black line on white paper
    out = preprocessors.scribble(page, None)
    assert out[8].min() == 1.0 and out[0].max() == 0.0
    assert np.array_equal(preprocessors.scribble(1 - page, None), out)


def test_lineart_tile_blur_and_inpaint() -> None:
    image = square()
    lines = preprocessors.lineart(1 - image, None, sigma=2.0)[..., 0]  # a dark square on white paper
    assert lines[16, 8] > 0.5 and lines[16, 6] == 0 and lines[16, 16] < 0.01  # its edge is a line, white on black
    assert preprocessors.tile(image, None, down=4).shape == (8, 8, 3)
    assert 0 < preprocessors.blur(image, None, sigma=3)[8, 8, 0] < 1
    mask = np.zeros((32, 32), np.float32)
    mask[:4] = 1
    out = preprocessors.inpaint(image, mask)
    assert (out[:4] == -1).all() and np.array_equal(out[4:], image[4:])
    with pytest.raises(ParameterError, match="needs a mask"):
        preprocessors.inpaint(image, None)


class InvertedDepth:
    """A third-party preprocessor: its options are declared and validated like task parameters."""

    seen: dict[str, Any] = {}

    @hookimpl
    def register_preprocessors(self, register):
        def fake_depth(image, mask, near=0.0):
            InvertedDepth.seen = {"shape": image.shape, "near": near}
            return np.clip(1.0 - image + near, 0, 1)

        register("fake-depth", fake_depth, summary="test", options=(Param("near", "float", default=0.0, max=1.0),))


def test_a_plugin_preprocessor_is_used_by_name_with_its_options(models: Path) -> None:
    registry = build_registry([InvertedDepth()], entry_points=False)
    assert registry.preprocessors["fake-depth"].plugin == "InvertedDepth"
    result = run(models, [f"cn-edges={models / 'edges.png'},pre=fake-depth,near=0.25"], registry)
    assert InvertedDepth.seen == {"shape": (48, 64, 3), "near": 0.25}
    assert "Module: fake-depth, Model: cn-edges [" in result.record["controlnet"][0]
    with pytest.raises(ParameterError, match="preprocessor fake-depth has no option 'far'"):
        run(models, [f"cn-edges={models / 'edges.png'},pre=fake-depth,far=1"], registry)
    with pytest.raises(ParameterError, match="unknown ControlNet preprocessor 'depth'"):
        run(models, [f"cn-edges={models / 'edges.png'},pre=depth"], registry)


def test_a_duplicate_preprocessor_is_refused_naming_the_first_plugin() -> None:
    class Again:
        @hookimpl
        def register_preprocessors(self, register):
            register("canny", preprocessors.none)

    registry = build_registry([Again()], entry_points=False)
    failure = next(f for f in registry.failures if f.plugin == "Again")
    assert "already registered by plugin 'difftool.plugins.builtin.sd.preprocessors'" in failure.error
    with pytest.raises(PluginError):
        registry._register_preprocessor("x", "canny", "not callable")


# --- models: discovery, family, backends -----------------------------------------------------------


def test_controlnets_are_listed_with_their_family_and_found_by_name(models: Path) -> None:
    found = {e.name: e.family for e in build_registry(entry_points=False).find_models()}
    assert found["cn-edges"] == "sd1-controlnet" and found["cn-xl"] == "sdxl-controlnet"
    assert found["tiny-sd"] == "sd1"
    result = run(models, [f"cn-edges={models / 'edges.png'},pre=canny"])
    plain = run(models, [])
    assert np.abs(np.asarray(result.images[0], np.int16) - np.asarray(plain.images[0], np.int16)).max() > 5


def test_a_controlnet_of_another_family_is_refused(models: Path) -> None:
    with pytest.raises(ModelError, match="cn-xl is a sdxl ControlNet, the model is Stable Diffusion 1.x") as error:
        run(models, [f"cn-xl={models / 'edges.png'}"])
    assert "use a sd1 ControlNet" in error.value.fix


def test_unknown_controlnets_and_missing_images_are_named(models: Path) -> None:
    with pytest.raises(ModelError, match="ControlNet 'nope' not found"):
        run(models, ["nope"])
    with pytest.raises(ParameterError, match="ControlNet cn-edges has no control image"):
        run(models, ["cn-edges"])  # generate has no input image to fall back on
    with pytest.raises(ModelError, match="is not a ControlNet"):
        run(models, [f"{models / 'models/Stable-diffusion/tiny-sd/unet/diffusion_pytorch_model.safetensors'}"])


def test_a_pickle_controlnet_needs_allow_pickle(models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cn-pickle"
    folder.mkdir()
    (folder / "config.json").write_text((models / "models/ControlNet/cn-xl/config.json").read_text())
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelError, match="holds no safetensors weights"):
        run(models, [f"{folder}={models / 'edges.png'}"])


# --- CLI and metadata ------------------------------------------------------------------------------


def test_cli_takes_repeated_control_and_records_a1111_units(models: Path, tmp_path: Path) -> None:
    registry = build_registry(entry_points=False)
    model = models / "models" / "Stable-diffusion" / "tiny-sd"
    edges = models / "edges.png"
    args = ["run", "generate", "--model", model, "--prompt", "a tower", "--steps", "2", "--width", "64",
            "--height", "48", "--dtype", "fp32", "-o", tmp_path / "out.png",
            "--control", f"cn-edges={edges},pre=canny,low=80,weight=0.7,end=0.5",
            "--control", f"cn-edges={edges},pre=scribble,guess=1,resize=fill"]  # fmt: skip
    result = CliRunner().invoke(cli.cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    parameters = Image.open(tmp_path / "out.png").text["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: cn-edges [' in parameters
    assert "Weight: 0.7, Resize Mode: Crop and Resize, Threshold A: 80, Threshold B: 200, Guidance Start: 0, " in (
        parameters
    )
    assert (
        "Weight: 1, Resize Mode: Resize and Fill, Guidance Start: 0, Guidance End: 1, "
        "Control Mode: ControlNet is more important" in parameters
    )
    restored = metadata.params_from_a1111(read_metadata(tmp_path / "out.png")["parameters"])
    assert restored["control"] == [
        "cn-edges,pre=canny,weight=0.7,start=0,end=0.5,low=80,high=200",
        "cn-edges,pre=scribble,weight=1,start=0,end=1,guess=1,resize=fill",
    ]
    help_text = CliRunner().invoke(cli.cli, ["run", "generate", "--help"], obj=registry).output
    assert "--control" in help_text and "MODEL[=IMAGE]" in help_text


def test_resize_modes_crop_stretch_or_pad_to_the_output_aspect() -> None:
    from difftool.plugins.builtin.sd.controlled import fit

    image = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4, 8, 3)  # 8 wide, 4 high
    np.testing.assert_array_equal(fit(image, (4, 4), "crop"), image[:, 2:6])  # the middle square
    np.testing.assert_array_equal(fit(image, (16, 8), "crop"), image)  # same aspect: untouched
    assert fit(image, (4, 4), "just") is image  # stretched later, by the resize
    filled = fit(image, (16, 16), "fill")  # fitted inside the output (16 x 8), then padded to it
    assert filled.shape == (16, 16, 3)
    assert filled[4:12].min() >= 0 and filled[4:12].max() > 80  # the image, resized
    assert not filled[:4].any() and not filled[12:].any()  # black bands: no edges there
    tall = fit(-np.ones((8, 4, 3), np.float32), (4, 4), "crop")
    assert tall.shape == (4, 4, 3)
    assert fit(np.full((8, 4, 3), -1.0, np.float32), (8, 4), "fill")[0, 0, 0] == -1.0  # inpaint: to be made
    assert parse_unit("cn,resize=fill").resize == "fill" and parse_unit("cn").resize == "crop"
    with pytest.raises(ParameterError, match="ControlNet resize 'stretch' is not one of crop, just, fill"):
        parse_unit("cn,resize=stretch")


@pytest.mark.parametrize("mode", ["crop", "just", "fill"])
def test_a_thin_control_image_makes_no_intermediate_larger_than_image_or_output(tmp_path: Path, mode: str) -> None:
    """Issue 29 item 13: a 1 x 20000 control image with resize=fill padded at its own resolution
    (20000 x 20000 floats, 14.6 GB) for a 64 x 64 output. Here 1 x 2000 (48 MB before the fix): every
    array made while fitting and resizing it stays under 1 MB (tracemalloc sees numpy's allocations)."""
    import tracemalloc
    from types import SimpleNamespace

    from difftool.plugins.builtin.sd.controlled import control_image, fit

    thin = tmp_path / "thin.png"
    Image.fromarray(np.full((1, 2000, 3), 255, np.uint8)).save(thin)
    negative = np.full((2000, 1, 3), -1.0, np.float32)  # the inpaint preprocessor's "to be made"
    unit, context = parse_unit(f"cn={thin},resize={mode}"), SimpleNamespace(registry=build_registry(entry_points=False))
    control_image(parse_unit(f"cn={thin},resize=just"), (64, 64), context, None)  # imports, outside the count
    tracemalloc.start()
    try:
        seen = control_image(unit, (64, 64), context, None)
        padded = fit(negative, (64, 64), mode)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak / 1e6:.1f} MB traced"
    assert tuple(seen.shape) == (1, 3, 64, 64)
    if mode == "fill":
        assert padded.shape == (64, 64, 3) and (padded == -1.0).all()
        row = seen[0, 0, :, 32].numpy()
        assert row.max() > 0.9 and (row < 0.01).sum() >= 62  # one white line across the middle, black elsewhere


def test_a_control_image_of_another_aspect_is_cropped_by_default(tmp_path: Path) -> None:
    """The control image the ControlNet sees (1 x 3 x H x W in [0, 1]) for a 2:1 image and a 4:3 output."""
    from types import SimpleNamespace

    from difftool.plugins.builtin.sd.controlled import control_image

    wide = tmp_path / "wide.png"
    pixels = np.zeros((48, 96, 3), np.uint8)
    pixels[:, :16] = 255  # a white band at the left, cut off by crop
    Image.fromarray(pixels).save(wide)
    context = SimpleNamespace(registry=build_registry(entry_points=False))
    seen = {
        mode: control_image(parse_unit(f"cn={wide},resize={mode}"), (64, 48), context, None)[0, 0].numpy()
        for mode in ("crop", "just", "fill")
    }
    assert seen["crop"].shape == seen["just"].shape == seen["fill"].shape == (48, 64)
    assert seen["crop"].max() < 0.01  # the middle 64 x 48: all black
    assert seen["just"][:, :8].min() > 0.9 and seen["just"][:, 12:].max() < 0.1  # squeezed to 64 wide: 10.7 px
    assert seen["fill"][:6].max() < 0.01 and seen["fill"][10:38, :8].min() > 0.9  # 64 x 32 between black bands
    assert seen["fill"][10:38, 12:].max() < 0.1


def test_a1111_module_names_map_to_difftools() -> None:
    text = "Module: tile_resample, Model: control_v11f1e_sd15_tile [a371b31b], Weight: 0.6, Guidance Start: 0.1"
    assert metadata.controlnet_spec(text) == "control_v11f1e_sd15_tile,pre=tile,weight=0.6,start=0.1,end=1"
    assert metadata.controlnet_spec("Module: none, Model: None, Weight: 1") is None
