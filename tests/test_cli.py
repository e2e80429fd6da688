import json
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from difftool import cli
from difftool.core.images import read_metadata
from difftool.core.task import Param, Port, Task, TaskResult
from difftool.plugins import hookimpl
from difftool.plugins.registry import build_registry


class Everything(Task):
    name = "everything"
    summary = "Declares one parameter of each type"
    params = (
        Param("count", "int", default=2, min=1, max=9, help="how many"),
        Param("amount", "float", default=0.5, min=0, max=1),
        Param("flip", "bool", default=False),
        Param("text", "string", default="hi", multiline=True),
        Param("mode", "choice", default="a", choices=("a", "b")),
        Param("scheduler", "choice", default="ddim", choices_from="schedulers"),
        Param("mask", "mask"),
        Param("ref", "image"),
        Param("where", "path"),
    )
    inputs = (Port("image", "image"),)

    def run(self, request, context):
        if request.params["text"] == "crash":
            raise ZeroDivisionError("division by zero in plugin code")
        return TaskResult([request.inputs["image"].to_pil()], {"size": "?"})


class EverythingPlugin:
    @hookimpl
    def register_tasks(self, register):
        register(Everything)


@pytest.fixture
def runner():
    registry = build_registry([EverythingPlugin()], entry_points=False)

    def invoke(*args: str):
        return CliRunner().invoke(cli.cli, [str(a) for a in args], obj=registry)

    return invoke


def test_a_run_builds_its_command_once_from_the_invocations_registry(photo: Path, tmp_path: Path) -> None:
    """The registry comes from ``click.Context.obj``; ``difftool run TASK`` builds TASK's command once."""
    asked: list[str] = []

    class Counting(EverythingPlugin):
        @hookimpl
        def register_tasks(self, register):
            class Counted(Everything):
                def __init__(self) -> None:
                    asked.append("everything")

            register(Counted)

    registry = build_registry([Counting()], entry_points=False)
    out = tmp_path / "out.png"
    result = CliRunner().invoke(cli.cli, ["run", "everything", str(photo), "-o", str(out)], obj=registry)
    assert result.exit_code == 0, result.output
    assert out.is_file()  # "everything" is only in this registry: the command came from ctx.obj
    # One instance for the command's declaration, one for the preflight, one for the run (4 when the
    # command was built twice, once to check the name and once to run it).
    assert len(asked) <= 3, asked


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("Error:"), result.stderr
    assert "Traceback" not in result.stderr
    return lines[-1]


def test_declared_parameters_become_typed_options() -> None:
    registry = build_registry([EverythingPlugin()], entry_points=False)
    command = cli.task_command("everything", registry)
    options = {p.name: p for p in command.params}
    assert isinstance(options["count"].type, click.types.IntRange) and options["count"].type.max == 9
    assert isinstance(options["amount"].type, click.types.FloatRange)
    assert options["flip"].is_flag and options["flip"].secondary_opts == ["--no-flip"]
    assert options["mode"].type.choices == ("a", "b")
    assert "dpmpp-2m-karras" in options["scheduler"].type.choices
    assert isinstance(options["mask"].type, click.Path) and options["mask"].type.exists
    assert options["count"].help == "how many" and options["count"].default == 2
    assert {"seed", "as_json", "debug", "output", "overwrite"} <= set(options)
    # the task loads no model: no --model, and no backend, device or precision to choose
    assert not {"model", "backend", "device", "dtype", "backend_opt"} & set(options)
    superres = {p.name for p in cli.task_command("superres", registry).params}
    assert {"model", "backend", "device", "dtype", "backend_opt"} <= superres


def test_tasks_and_schedulers_and_plugins_listing(runner, monkeypatch) -> None:
    from difftool.plugins.builtin import pixel_model

    listing = runner("tasks")
    assert listing.exit_code == 0
    rows = {line.split()[0]: line.split()[1] for line in listing.output.splitlines()}
    assert rows["superres"] == "ready" and rows["inpaint"] == "ready" and rows["everything"] == "ready"
    monkeypatch.setattr(pixel_model, "EMBEDDED_ROOT", Path("/nonexistent"))
    missing = {line.split()[0]: " ".join(line.split()[1:3]) for line in runner("tasks").output.splitlines()}
    assert missing["superres"] == "needs --model" and missing["everything"].startswith("ready")
    detail = runner("tasks", "everything")
    assert "--count" in detail.output and "[1, 9]" in detail.output
    assert "dpmpp-2m-karras" in runner("schedulers").output
    assert "EverythingPlugin" in runner("plugins").output


def test_run_writes_output_with_metadata(runner, photo: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.png"
    result = runner("run", "everything", photo, "-o", out, "--seed", "9", "--count", "3")
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)["difftool"]
    assert meta["seed"] == 9 and meta["count"] == 3 and meta["task"] == "everything"


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["run", "everything", "missing.png"], 1, "no such file"),
        (["run", "nosuchtask", "x.png"], 2, "unknown task 'nosuchtask'"),
        (["run", "everything", "{photo}", "--count", "0"], 2, "0 is not in the range 1<=x<=9"),
        (["run", "everything", "{photo}", "--scheduler", "nope"], 2, "'nope' is not one of"),
        (["run", "everything", "{text}"], 1, "is not an image"),
        (["run", "superres", "{photo}", "--backend", "nope"], 2, "'nope' is not one of"),
        (["run", "superres", "{photo}", "--backend", "tensorrt"], 1, "TensorRT needs an NVIDIA GPU"),
        (["run", "superres", "{photo}", "--device", "cuda:3"], 1, "backend 'torch' cannot run on cuda:3"),
        (["run", "superres", "{photo}", "--backend-opt", "threads=2"], 2, "backend 'torch' has no option 'threads'"),
        (["run", "superres", "{photo}", "--backend", "onnx", "--backend-opt", "threads=x"], 2, "threads"),
        (["run", "superres", "{photo}", "--backend-opt", "threads"], 2, "'threads' is not NAME=VALUE"),
        (["run", "everything", "{photo}", "--backend", "onnx"], 2, "No such option '--backend'"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(runner, photo: Path, tmp_path: Path, args, code, fragment) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    argv = [a.format(photo=photo, text=text) for a in args]
    result = runner(*argv, "-o", tmp_path / "out.png") if argv[1] != "nosuchtask" else runner(*argv)
    assert result.exit_code == code, result.output
    assert fragment in one_line_error(result)


def test_task_bug_names_the_plugin_and_hides_the_traceback(runner, photo: Path, tmp_path: Path) -> None:
    result = runner("run", "everything", photo, "--text", "crash", "-o", tmp_path / "o.png")
    assert result.exit_code == 1
    line = one_line_error(result)
    assert "task 'everything' (plugin EverythingPlugin) failed: ZeroDivisionError" in line
    debug = runner("run", "everything", photo, "--text", "crash", "-o", tmp_path / "o.png", "--debug")
    assert "Traceback" in debug.stderr


def test_existing_output_needs_overwrite(runner, photo: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.png"
    out.write_bytes(b"keep me")
    result = runner("run", "everything", photo, "-o", out)
    assert result.exit_code == 1 and "--overwrite" in one_line_error(result)
    assert out.read_bytes() == b"keep me"
    assert runner("run", "everything", photo, "-o", out, "--overwrite").exit_code == 0
    assert out.read_bytes() != b"keep me"


def test_folder_batch_with_json_and_per_image_seeds(runner, tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "sub/c.png"):
        Image.new("RGB", (6, 4), (10, 20, 30)).save(src / name)
    (src / "notes.txt").write_text("ignored: not an image suffix")
    result = runner("run", "everything", src, "-o", tmp_path / "out", "--seed", "5", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["failed"] == 0 and len(summary["results"]) == 3
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == [
        "a.png",
        "b.png",
        "sub/c.png",
    ]
    seeds = [r["seed"] for r in summary["results"]]
    assert len(set(seeds)) == 3  # derived per input, recorded
    from difftool.app.api import derive_seed

    assert seeds == [derive_seed(5, key) for key in ("a.png", "b.jpg", "sub/c.png")]


def test_batch_goes_on_after_a_bad_file_and_exits_1(runner, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (4, 4)).save(src / "good.png")
    (src / "bad.png").write_bytes(b"garbage")
    result = runner("run", "everything", src, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 1
    statuses = {Path(r["input"]).name: r["status"] for r in json.loads(result.stdout)["results"]}
    assert statuses == {"bad.png": "failed", "good.png": "ok"}
    assert (tmp_path / "out" / "good.png").exists() and not (tmp_path / "out" / "bad.png").exists()


def test_superres_end_to_end_with_a_model_folder(runner, photo: Path, superres_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "big.png"
    result = runner("run", "superres", photo, "--model", superres_model, "--scale", "2", "-o", out, "--seed", "3")
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (56, 40)
    meta = read_metadata(out)
    assert meta["difftool"]["scale"] == 2 and meta["difftool"]["model"] == "tiny-superres"
    assert meta["parameters"]["Seed"] == "3"


def test_task_without_model_says_what_to_pass(runner, photo: Path, monkeypatch) -> None:
    from difftool.plugins.builtin import pixel_model

    monkeypatch.setattr(pixel_model, "EMBEDDED_ROOT", Path("/nonexistent"))
    result = runner("run", "superres", photo)
    assert result.exit_code == 1
    assert "--model PATH" in one_line_error(result)


def test_inpaint_keeps_unmasked_pixels_bit_exact(runner, photo: Path, inpaint_model: Path, tmp_path: Path) -> None:
    mask = np.zeros((20, 28), dtype=np.uint8)
    mask[5:12, 8:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "filled.png"
    result = runner("run", "inpaint", photo, "--mask", tmp_path / "mask.png", "--model", inpaint_model, "-o", out)
    assert result.exit_code == 0, result.output
    before, after = np.asarray(Image.open(photo)), np.asarray(Image.open(out))
    assert np.array_equal(before[mask == 0], after[mask == 0])
    assert not np.array_equal(before[mask > 0], after[mask > 0])


def test_inpaint_mask_size_mismatch(runner, photo: Path, inpaint_model: Path, tmp_path: Path) -> None:
    Image.new("L", (5, 5), 255).save(tmp_path / "small.png")
    args = ["run", "inpaint", photo, "--mask", tmp_path / "small.png", "--model", inpaint_model]
    result = runner(*args, "-o", tmp_path / "o.png")
    assert result.exit_code == 2 and "--resize-mask" in one_line_error(result)
    assert runner(*args, "-o", tmp_path / "o.png", "--resize-mask").exit_code == 0


def test_version() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(cli.cli, ["--version"])
    assert result.exit_code == 0 and f"version {version('difftool')}" in result.output  # the installed version


def test_an_output_never_replaces_an_input(runner, photo: Path) -> None:
    before = photo.read_bytes()
    for extra in ((), ("--overwrite",)):
        result = runner("run", "everything", photo, "-o", photo, *extra)
        assert result.exit_code == 2 and "would overwrite an input" in one_line_error(result)
    assert photo.read_bytes() == before


def test_a_folder_run_removes_temp_files_of_a_killed_run(runner, photo: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    from difftool.core.atomic import _temp_tag

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    name = f"{photo.stem}.png"
    stale = out / f".difftool-{dead}-00c0ffee-{_temp_tag(dead, '00c0ffee', name)}.{name}.tmp"
    stale.write_bytes(b"half an image")
    lookalike = out / f".{photo.stem}.png.{dead}.x1y2.tmp"  # an old-style name: not provably ours
    lookalike.write_bytes(b"a user's file")
    assert runner("run", "everything", photo, "-o", out).exit_code == 0
    assert not stale.exists() and (out / f"{photo.name}").with_suffix(".png").exists()
    assert lookalike.read_bytes() == b"a user's file"


def test_backends_lists_each_backends_options_and_why_it_cannot_run(runner) -> None:
    result = runner("backends")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "--backend-opt provider=" in text and "auto|cpu|cuda|tensorrt" in text and "DIFFTOOL_ORT_PROVIDER" in text
    assert "--backend-opt max_size=" in text and "default 1024" in text and "--backend-opt url=" in text
    tensorrt = text[text.index("tensorrt (") :]
    assert "cpu: unavailable: TensorRT needs an NVIDIA GPU" in tensorrt


def test_backend_options_reach_the_record(runner, photo: Path, superres_model: Path, tmp_path: Path,
                                          monkeypatch) -> None:  # fmt: skip
    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "o.png"
    result = runner("run", "superres", photo, "--model", superres_model, "--scale", "2", "--backend", "onnx",
                    "--backend-opt", "threads=1", "--backend-opt", "provider=cpu", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)["difftool"]
    assert meta["backend"] == "onnx" and meta["backend_options"] == {"provider": "cpu", "export": "unet"}


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--prompt", "a", "--hires", "nan"],
        ["generate", "--prompt", "a", "--hires", "2", "--hires-strength", "nan"],
        ["style", "IMAGE", "--strength", "nan"],
        ["upscale-sd", "IMAGE", "--strength", "inf"],
        ["upscale-sd", "IMAGE", "--scale", "nan"],
        ["inpaint", "IMAGE", "--mask", "IMAGE", "--strength", "nan"],
        ["inpaint", "IMAGE", "--mask", "IMAGE", "--texture", "nan"],
    ],
)
def test_nan_on_the_command_line_is_a_usage_error(args: list[str], tmp_path: Path) -> None:
    """Issue 29 item 15: these ran (or skipped a pass) and recorded nan."""
    image = tmp_path / "in.png"
    Image.new("RGB", (16, 16)).save(image)
    args = [str(image) if a == "IMAGE" else a for a in args]
    model = tmp_path / "model"
    model.mkdir()
    result = CliRunner().invoke(cli.cli, ["run", *args, "--model", str(model), "-o", str(tmp_path / "out.png")])
    assert result.exit_code == 2, result.output
    error = one_line_error(result)
    assert "is not a finite number" in error or ("inf is not in the range" in error)  # click's own range check
    assert not (tmp_path / "out.png").exists()
