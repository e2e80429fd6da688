"""Regression tests for the hardening round two defects (docs/reliability.md, cases 20-31) and a
hostile-input sweep: every case exits non-zero with one line, writes nothing partial, and leaves
every file it did not create exactly as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, PngImagePlugin
from test_cli import EverythingPlugin, one_line_error

from difftool import cli
from difftool.core import errors
from difftool.core.images import read_metadata, save_image
from difftool.plugins.registry import build_registry


@pytest.fixture
def runner():
    registry = build_registry([EverythingPlugin()], entry_points=False)
    return lambda *args: CliRunner().invoke(cli.cli, [str(a) for a in args], obj=registry)


def small_png(path: Path, value: int = 90) -> Path:
    Image.new("RGB", (12, 10), (value, 40, 200 - value)).save(path)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def text_bomb(path: Path, where: str) -> Path:
    """A valid PNG with zTXt chunks that decompress past Pillow's limits, before or after IDAT."""
    small_png(path)
    data = path.read_bytes()
    if where == "many":  # a hundred 0.9 MB chunks: over Pillow's 64 MB total for text
        chunks = b"".join(_chunk(b"zTXt", b"k%d\0\0" % i + zlib.compress(b"a" * 900_000, 9)) for i in range(100))
    else:
        chunks = _chunk(b"zTXt", b"bomb\0\0" + zlib.compress(b"a" * 8_000_000, 9))
    at = data.index(b"IDAT") - 4 if where == "before" else data.index(b"IEND") - 4
    path.write_bytes(data[:at] + chunks + data[at:])
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes (symlinks and FIFOs by their kind)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            found[str(path.relative_to(root))] = "special"
        elif path.is_file():
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# --- 1. deleting files it did not write ---------------------------------------------------------------


def test_a_run_beside_the_input_keeps_a_users_temp_looking_file(runner, tmp_path: Path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    photo = small_png(folder / "a.png")
    thesis = folder / ".thesis.2023.final.tmp"
    thesis.write_bytes(b"data")
    assert runner("run", "everything", photo).exit_code == 0
    assert thesis.read_bytes() == b"data" and (folder / "a.everything.png").exists()


# --- 2. PNG text-chunk bombs -------------------------------------------------------------------------


def test_text_chunk_bombs_fail_alone_and_the_batch_completes(runner, tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    small_png(src / "a_good.png")
    for where in ("before", "after", "many"):
        text_bomb(src / f"b_{where}.png", where)
    small_png(src / "z_good.png", 120)
    result = runner("run", "everything", src, "-o", out, "--json")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] == 2 and sorted(summary["failed_inputs"]) == ["b_after.png", "b_before.png", "b_many.png"]
    assert all("\n" not in r.get("error", "") for r in summary["results"])
    report = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert [r["status"] for r in report] == ["ok", "failed", "failed", "failed", "ok"]


def test_a_text_bomb_as_mask_or_at_the_output_name_is_one_line(runner, tmp_path: Path) -> None:
    photo = small_png(tmp_path / "photo.png")
    bomb = text_bomb(tmp_path / "bomb.png", "after")
    as_mask = runner("run", "everything", photo, "--mask", bomb, "-o", tmp_path / "o.png")
    assert as_mask.exit_code == 1 and "cannot be read" in one_line_error(as_mask)
    at_output = tmp_path / "taken.png"
    shutil.copy(bomb, at_output)
    before = at_output.read_bytes()
    result = runner("run", "everything", photo, "-o", at_output)
    assert result.exit_code == 1 and "--overwrite" in one_line_error(result)
    assert at_output.read_bytes() == before
    with pytest.raises(errors.ImageError, match="cannot be read"):
        read_metadata(bomb)


# --- 3. two inputs, one output name -------------------------------------------------------------------


def test_inputs_differing_only_in_extension_get_distinct_outputs(runner, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    small_png(src / "a.png", 10)
    Image.new("RGB", (12, 10), (200, 10, 10)).save(src / "a.jpg", quality=95)
    small_png(src / "b.png")
    out = tmp_path / "out"
    first = runner("run", "everything", src, "-o", out, "--overwrite")
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in out.glob("*.png")) == ["a.jpg.png", "a.png.png", "b.png"]
    assert read_metadata(out / "a.jpg.png")["difftool"]["input"].endswith("a.jpg")
    again = runner("run", "everything", src, "-o", out)
    assert again.exit_code == 0 and again.output.count("up to date") == 3
    beside = runner("run", "everything", src)
    assert beside.exit_code == 0
    assert {p.name for p in src.glob("*.everything.png")} == {
        "a.jpg.everything.png",
        "a.png.everything.png",
        "b.everything.png",
    }


# --- 4. an explicit seed belongs to the job ------------------------------------------------------------


def test_a_changed_seed_redoes_the_output_and_resume_reports_recorded_seeds(runner, tmp_path: Path) -> None:
    photo, out = small_png(tmp_path / "p.png"), tmp_path / "out.png"
    assert runner("run", "everything", photo, "--seed", "5", "-o", out).exit_code == 0
    changed = runner("run", "everything", photo, "--seed", "7", "-o", out)  # was: "up to date, skipped"
    assert changed.exit_code == 1 and "--overwrite" in one_line_error(changed)
    assert read_metadata(out)["difftool"]["seed"] == 5
    redo = runner("run", "everything", photo, "--seed", "7", "-o", out, "--overwrite")
    assert redo.exit_code == 0 and "up to date" not in redo.output
    assert read_metadata(out)["difftool"]["seed"] == 7
    same = runner("run", "everything", photo, "--seed", "7", "-o", out)
    assert "up to date" in same.output
    src, folder = tmp_path / "in", tmp_path / "outs"
    src.mkdir()
    for i in range(3):
        small_png(src / f"{i}.png", 30 * i)
    assert runner("run", "everything", src, "-o", folder).exit_code == 0
    resumed = runner("run", "everything", src, "-o", folder, "--json")  # no --seed: keeps what is there
    for record in json.loads(resumed.stdout)["results"]:
        assert record["status"] == "skipped"
        assert record["seed"] == read_metadata(record["outputs"][0])["difftool"]["seed"]


# --- 5. 16-bit grayscale into 8-bit formats --------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".bmp"])
def test_sixteen_bit_gray_is_rescaled_not_clipped_for_8_bit_formats(tmp_path: Path, suffix: str) -> None:
    ramp = np.tile(np.linspace(0, 65535, 64), (16, 1)).astype(np.uint16)
    path = save_image(Image.fromarray(ramp), tmp_path / f"g{suffix}")
    with Image.open(path) as written:
        gray = np.asarray(written.convert("L"), dtype=np.float64)
    assert abs(gray.mean() - ramp.mean() / 257) < 3  # was ~255 (99% white)
    assert gray[:, 0].mean() < 10 and gray[:, -1].mean() > 245


def test_superres_keep_mode_16_bit_to_jpeg(runner, superres_model: Path, tmp_path: Path) -> None:
    source = tmp_path / "g16.png"
    Image.fromarray(np.full((12, 16), 20000, np.uint16)).save(source)
    out = tmp_path / "g16.jpg"
    result = runner("run", "superres", source, "--keep-mode", "--scale", "2", "--model", superres_model, "-o", out)
    assert result.exit_code == 0, result.output
    with Image.open(out) as written:
        assert written.mode == "L" and np.asarray(written).mean() < 200  # 20000/257 = 78, not white


# --- 6. unwritable outputs are found before any work -----------------------------------------------------


def test_an_unwritable_output_fails_before_any_work(runner, tmp_path: Path, monkeypatch) -> None:
    from test_cli import Everything

    calls = []
    monkeypatch.setattr(Everything, "run", lambda self, request, context: calls.append(1))
    photo = small_png(tmp_path / "p.png")
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    for target in (blocker / "out", blocker / "out.png"):
        result = runner("run", "everything", photo, "-o", target)
        assert result.exit_code == 1 and "cannot write to" in one_line_error(result)
    src = tmp_path / "in"
    src.mkdir()
    small_png(src / "x.png")
    folder = runner("run", "everything", src, "-o", blocker / "sub")
    assert folder.exit_code == 1 and "cannot write to" in one_line_error(folder)
    assert calls == [] and blocker.read_text().startswith("a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_fails_before_any_work(runner, tmp_path: Path) -> None:
    photo, locked = small_png(tmp_path / "p.png"), tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = runner("run", "everything", photo, "-o", locked)
    assert result.exit_code == 1 and "cannot write to" in one_line_error(result)


# --- 7. FIFOs and other special files --------------------------------------------------------------------


def test_a_fifo_input_or_mask_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "in.png"
    os.mkfifo(fifo)
    photo = small_png(tmp_path / "p.png")
    for args in (["run", "superres", str(fifo)], ["run", "inpaint", str(photo), "--mask", str(fifo)]):
        done = subprocess.run(
            [sys.executable, "-m", "difftool", *args, "-o", str(tmp_path / "o.png")],
            capture_output=True,
            text=True,
            timeout=120,  # it used to block forever
        )
        assert done.returncode == 1 and "not a regular file" in done.stderr.strip().splitlines()[-1]
        assert "Traceback" not in done.stderr


# --- 8. the user's mistakes are not blamed on a plugin -----------------------------------------------------


def _broken_copy(model: Path, tmp_path: Path, name: str, damage) -> Path:
    copy = tmp_path / name
    shutil.copytree(model, copy)
    damage(copy)
    return copy


def test_model_and_config_mistakes_name_the_users_fix(runner, superres_model: Path, tmp_path: Path, monkeypatch):
    photo = small_png(tmp_path / "p.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_json = _broken_copy(superres_model, tmp_path, "badjson", lambda p: (p / "difftool.json").write_text("{oops"))
    no_sched = _broken_copy(superres_model, tmp_path, "nosched", lambda p: (p / "scheduler_config.json").unlink())
    cases = [
        (["run", "generate", "--prompt", "x", "--model", empty], "not a Stable Diffusion model folder"),
        (["run", "superres", photo, "--model", bad_json], "difftool.json is not valid JSON"),
        (["run", "superres", photo, "--model", no_sched], "has no scheduler_config.json"),
    ]
    for args, fragment in cases:
        result = runner(*args, "-o", tmp_path / "o.png", "--overwrite")
        line = one_line_error(result)
        assert result.exit_code == 1 and fragment in line and "plugin" not in line, line
    cache_file = tmp_path / "cachefile"
    cache_file.write_text("not a folder")
    monkeypatch.setenv("DIFFTOOL_CACHE", str(cache_file))
    verify = runner("cache", "verify")
    assert verify.exit_code == 1 and "is a file, not a folder" in verify.output
    onnx = runner("run", "superres", photo, "--model", superres_model, "--backend", "onnx", "-o", tmp_path / "x.png")
    line = one_line_error(onnx)
    assert onnx.exit_code == 1 and "DIFFTOOL_CACHE" in line and "plugin" not in line
    assert cache_file.read_text() == "not a folder"


# --- 9. -o rules ------------------------------------------------------------------------------------------


def test_o_with_an_image_suffix_is_a_file_or_a_clear_error(runner, tmp_path: Path, monkeypatch) -> None:
    photo = small_png(tmp_path / "p.png")
    bmp = tmp_path / "result.bmp"
    assert runner("run", "everything", photo, "-o", bmp).exit_code == 0
    assert bmp.is_file()
    with Image.open(bmp) as written:
        assert written.format == "BMP"
    from test_cli import Everything

    calls = []
    monkeypatch.setattr(Everything, "run", lambda self, request, context: calls.append(1))
    gif = runner("run", "everything", photo, "-o", tmp_path / "result.gif")
    assert gif.exit_code == 2 and "does not write .gif" in one_line_error(gif)
    null = runner("run", "everything", photo, "-o", "/dev/null")
    assert null.exit_code == 2 and "not a regular file" in one_line_error(null)
    assert calls == [] and not (tmp_path / "result.gif").exists()


# --- 10. concurrent runs on one output folder ---------------------------------------------------------------

SLOW_RUN = """
import os, sys, time
from difftool import cli
from difftool.core.task import Port, Task, TaskResult
from difftool.plugins import hookimpl
from difftool.plugins.registry import build_registry

class Slow(Task):
    name = "slow"
    summary = "records each call, then takes a moment"
    inputs = (Port("image", "image"),)
    def run(self, request, context):
        with open(os.environ["CALLS"], "a") as log:
            log.write(f"{os.getpid()} {request.inputs['image'].rgb[..., 0].mean():.6f}\\n")
        time.sleep(0.4)
        return TaskResult([request.inputs["image"].to_pil()], {})

class Plugin:
    @hookimpl
    def register_tasks(self, register):
        register(Slow)

registry = build_registry([Plugin()], entry_points=False)
start = float(sys.argv[1])
time.sleep(max(0.0, start - time.time()))
cli.main(["run", "slow", *sys.argv[2:]], registry=registry)
"""


def test_two_concurrent_runs_process_each_input_once(tmp_path: Path) -> None:
    import time

    src, out, calls = tmp_path / "in", tmp_path / "out", tmp_path / "calls.log"
    src.mkdir()
    for i in range(6):
        small_png(src / f"{i}.png", 20 + 30 * i)
    start = time.time() + 4  # both import first, then start together
    env = {**os.environ, "CALLS": str(calls), "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SLOW_RUN, str(start), str(src), "-o", str(out), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    lines = calls.read_text().splitlines()
    assert len(lines) == 6 and len({line.split()[1] for line in lines}) == 6  # each input exactly once
    assert len({line.split()[0] for line in lines}) == 2  # and both processes did some of the work
    ok = sum(json.loads(stdout)["ok"] for stdout, _ in results)
    assert ok == 6 and len(list(out.glob("*.png"))) == 6
    assert not list(out.glob(".difftool-*"))  # no claim or temp file left behind


# --- 11. exit codes ------------------------------------------------------------------------------------------


def test_one_exit_code_rule_for_each_error_class(runner, tmp_path: Path) -> None:
    assert errors.exit_code(errors.ParameterError("x")) == 2
    for cls in (
        errors.ModelError,
        errors.ImageError,
        errors.OutputError,
        errors.OutputExistsError,
        errors.BackendUnavailableError,
        errors.PluginError,
        errors.DifftoolError,
    ):
        assert errors.exit_code(cls("x")) == 1
    import pickle

    evil = tmp_path / "evil.ckpt"
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil.write_bytes(pickle.dumps(Evil()))
    refused = runner("run", "generate", "--prompt", "x", "--model", evil, "-o", tmp_path / "o.png")
    assert refused.exit_code == 1 and "pickle" in one_line_error(refused) and not marker.exists()
    usage = runner("run", "everything", small_png(tmp_path / "p.png"), "--count", "0")
    assert usage.exit_code == 2


# --- the sweep ---------------------------------------------------------------------------------------------


def test_hostile_input_sweep_changes_nothing_it_did_not_create(runner, superres_model: Path, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    photo = small_png(work / "photo.png")
    for where in ("before", "after", "many"):
        text_bomb(work / f"bomb_{where}.png", where)
    (work / "text.png").write_text("not an image")
    (work / "empty.png").write_bytes(b"")
    (work / "trunc.png").write_bytes(photo.read_bytes()[:45])
    os.mkfifo(work / "fifo.png")
    (work / ".thesis.2023.final.tmp").write_bytes(b"user data")
    (work / "notdir").write_text("a file")
    (work / "out.png").write_bytes(b"someone else's output")
    bad_model = _broken_copy(superres_model, work, "badmodel", lambda p: (p / "difftool.json").write_text("[1"))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "x" * 100)
    Image.new("RGB", (12, 10)).save(work / "meta.png", pnginfo=info)
    cases = [
        ["run", "everything", work / "bomb_before.png"],
        ["run", "everything", work / "bomb_after.png", "-o", work / "o1.png"],
        ["run", "everything", work / "bomb_many.png", "-o", work / "o2.png"],
        ["run", "everything", work / "text.png", "-o", work / "o3.png"],
        ["run", "everything", work / "empty.png", "-o", work / "o4.png"],
        ["run", "everything", work / "trunc.png", "-o", work / "o5.png"],
        ["run", "everything", work / "fifo.png", "-o", work / "o6.png"],
        ["run", "everything", photo, "--mask", work / "bomb_after.png", "-o", work / "o7.png"],
        ["run", "everything", photo, "-o", work / "out.png"],
        ["run", "everything", photo, "-o", work / "notdir" / "x.png"],
        ["run", "everything", photo, "-o", work / "x.gif"],
        ["run", "everything", photo, "-o", photo, "--overwrite"],
        ["run", "superres", photo, "--model", bad_model, "-o", work / "o8.png"],
        ["run", "superres", photo, "--model", work / "text.png", "-o", work / "o9.png"],
    ]
    for args in cases:
        before = snapshot(work)
        result = runner(*args)
        assert result.exit_code != 0, args
        one_line_error(result)
        assert snapshot(work) == before, args  # nothing created, modified or deleted


def test_a_bad_input_size_limit_is_one_line(runner, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DIFFTOOL_MAX_INPUT_BYTES", "1G")
    result = runner("run", "everything", small_png(tmp_path / "p.png"), "-o", tmp_path / "o.png")
    assert result.exit_code == 1 and "DIFFTOOL_MAX_INPUT_BYTES='1G' is not an integer" in one_line_error(result)
    monkeypatch.setenv("DIFFTOOL_MAX_INPUT_BYTES", "10")
    big = runner("run", "everything", small_png(tmp_path / "q.png"), "-o", tmp_path / "o.png")
    assert big.exit_code == 1 and "over the input limit of 10" in one_line_error(big)


# --- Issue 29, round three: the command line and the Python API ----------------------------------------


def test_a_file_name_that_is_not_utf8_is_processed_like_any_other(runner, tmp_path: Path) -> None:
    """Issue 29 item 14: ``b"\\xff.png"`` aborted the whole folder job with a traceback (the seed hashed the
    name's text), and alone did all the work, then died at save (the temp name's tag). Decided: such a
    name is processed like any other; its seed hashes the name's bytes on disk (``surrogateescape``)."""
    src = tmp_path / "in"
    src.mkdir()
    small_png(src / "a.png")
    odd = Path(os.fsdecode(os.fsencode(src) + b"/\xff.png"))  # what Python makes of the byte name
    small_png(odd, 60)
    out = tmp_path / "out"
    result = runner("run", "everything", src, "-o", out, "--seed", "5", "--json")
    assert result.exit_code == 0, result.output
    records = {r["key"]: r for r in json.loads(result.stdout)["results"]}
    assert {k: r["status"] for k, r in records.items()} == {"a.png": "ok", "\udcff.png": "ok"}
    expected = int.from_bytes(hashlib.sha256(b"5:\xff.png").digest()[:4], "little") & 0x7FFFFFFF
    assert records["\udcff.png"]["seed"] == expected
    assert sorted(os.listdir(os.fsencode(out))) == [b"a.png", b"report.jsonl", b"\xff.png"]
    made = out / odd.name
    assert read_metadata(made)["difftool"]["input"] == str(odd) and read_metadata(made)["difftool"]["seed"] == expected
    assert runner("run", "everything", src, "-o", out, "--seed", "5").output.count("up to date") == 2
    alone = runner("run", "everything", odd, "-o", tmp_path / "one")
    assert alone.exit_code == 0, alone.output
    assert sorted(os.listdir(os.fsencode(tmp_path / "one"))) == [b"report.jsonl", b"\xff.png"]


def test_a_240_byte_name_is_processed_into_an_output_folder(runner, tmp_path: Path) -> None:
    """Issue 29 item 19: ``.difftool-claim.<name>`` (and the temp name) of a 240-byte name is over the
    file system's 255 bytes, so such an input could never be processed into ``-o FOLDER``."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    long_name = "x" * 236 + ".png"
    small_png(src / long_name)
    small_png(src / ("\u00e9" * 118 + ".png"))  # 240 bytes of two-byte characters: cut between whole ones
    result = runner("run", "everything", src, "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted([long_name, "\u00e9" * 118 + ".png", "report.jsonl"])
    assert runner("run", "everything", src, "-o", out).output.count("up to date") == 2


def test_a_rerun_beside_the_inputs_skips_its_own_outputs(runner, tmp_path: Path) -> None:
    """Issue 29 item 19: without ``-o``, a rerun took the last run's ``a.everything.png`` for an input, and
    refused ("would overwrite an input") even with ``--overwrite``."""
    src = tmp_path / "in"
    src.mkdir()
    small_png(src / "a.png", 10)
    small_png(src / "b.png", 20)
    assert runner("run", "everything", src).exit_code == 0
    again = runner("run", "everything", src)
    assert again.exit_code == 0, again.output
    assert again.output.count("up to date") == 2 and "everything.everything" not in again.output
    redo = runner("run", "everything", src, "--overwrite", "--seed", "3", "--json")
    assert redo.exit_code == 0, redo.output
    assert sorted(r["key"] for r in json.loads(redo.stdout)["results"]) == ["a.png", "b.png"]
    assert sorted(p.name for p in src.iterdir()) == ["a.everything.png", "a.png", "b.everything.png", "b.png"]
    small_png(src / "c.png")
    small_png(src / "c.everything.png")  # the user's own file at an output's place: not ours, never replaced
    refused = runner("run", "everything", src, "--overwrite")
    assert refused.exit_code == 2 and "c.everything.png would overwrite an input" in one_line_error(refused)
