import os
from pathlib import Path

import pytest
from PIL import Image

from difftool.core.atomic import atomic_write, atomic_write_bytes, clean_stale_temps, replace_dir, temp_name
from difftool.core.images import save_image


def test_failure_mid_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(target) as handle:
        handle.write(b"new partial data")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_image_save_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "result.png"
    save_image(Image.new("RGB", (4, 4), (1, 2, 3)), target)
    before = target.read_bytes()

    def broken_save(self, fp, format=None, **kwargs):  # noqa: A002 - Pillow's signature
        fp.write(b"\x89PNG half")
        raise OSError("injected failure")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="injected"):
        save_image(Image.new("RGB", (4, 4), (9, 9, 9)), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["result.png"]


def test_new_file_appears_whole(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.txt"
    atomic_write_bytes(target, b"complete")
    assert target.read_bytes() == b"complete"


def test_written_files_get_normal_permissions(tmp_path: Path) -> None:
    import stat

    old = os.umask(0o022)
    try:
        target = tmp_path / "new.png"
        save_image(Image.new("RGB", (2, 2)), target)
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        target.chmod(0o640)
        save_image(Image.new("RGB", (2, 2)), target)  # replacing keeps the existing mode
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
    finally:
        os.umask(old)


# --- faults during a write ------------------------------------------------------------------------

KILLED_WRITER = """
import sys, time
from difftool.core.atomic import atomic_write
with atomic_write(sys.argv[1]) as handle:
    handle.write(b"new half")
    handle.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_killed_writer_leaves_the_old_file_and_a_temp_the_next_run_removes(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from difftool.core.atomic import clean_stale_temps

    target = tmp_path / "out.png"
    target.write_bytes(b"previous output")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert target.read_bytes() == b"previous output" and len(leftovers) == 1
    assert leftovers[0].name.startswith(f".difftool-{writer.pid}-")
    live = tmp_path / temp_name("other.png")  # a live writer's temp file is left alone
    live.write_bytes(b"in progress")
    assert clean_stale_temps(tmp_path) == leftovers
    assert sorted(tmp_path.iterdir()) == sorted([target, live])


def _dead_pid() -> int:
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)


def test_cleanup_never_deletes_files_it_cannot_prove_it_wrote(tmp_path: Path) -> None:
    """Regression (hardening #1): any `.X.<digits>.Y.tmp` used to be deleted, a user's thesis included."""
    dead = _dead_pid()

    # A dead writer's name with a tag that does not match (forged, or edited by hand) is not ours.
    users = {
        ".thesis.2023.final.tmp": b"data",
        f".out.png.{dead}.abc.tmp": b"old-style name",
        f".difftool-{dead}-0123abcd-0000000000000000.out.png.tmp": b"wrong tag",
        "notes.tmp": b"keep",
    }
    for name, data in users.items():
        (tmp_path / name).write_bytes(data)
    from difftool.core.atomic import _temp_tag

    nonce = "89abcdef"
    ours = tmp_path / f".difftool-{dead}-{nonce}-{_temp_tag(dead, nonce, 'out.png')}.out.png.tmp"
    ours.write_bytes(b"half")
    (tmp_path / "link").symlink_to(ours)
    assert clean_stale_temps(tmp_path) == [ours]
    for name, data in users.items():
        assert (tmp_path / name).read_bytes() == data


def test_replacing_a_folder_never_touches_a_users_old_folder(tmp_path: Path) -> None:
    target, new = tmp_path / "model", tmp_path / "new"
    target.mkdir()
    (target / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    users_old = tmp_path / ".model.old"
    users_old.mkdir()
    (users_old / "precious").write_text("keep")
    replace_dir(new, target)
    assert (target / "a").read_text() == "new"
    assert (users_old / "precious").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.old", "model"]


CLAIMER = """
import sys, time
from difftool.core.atomic import claim
with claim(sys.argv[1]) as mine:
    print(mine, flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_claims_are_exclusive_released_on_death_and_leave_no_file(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from difftool.core.atomic import claim, claim_path

    target = tmp_path / "out.png"
    holder = subprocess.Popen([sys.executable, "-c", CLAIMER, str(target), "60"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "True"
    with claim(target) as mine:
        assert mine is False  # a live process holds it
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with claim(target) as mine:
        assert mine is True  # the kernel dropped the dead holder's lock
    assert not claim_path(target).exists()
    user_file = claim_path(target)
    user_file.write_bytes(b"a user's file that happens to have this name")
    with claim(target) as mine:
        assert mine is True
    assert user_file.read_bytes().startswith(b"a user's file")  # not ours: never deleted


DISK_FULL_WRITER = """
import resource, signal, sys
import numpy as np
from PIL import Image
from difftool.core.images import save_image
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
try:
    save_image(Image.fromarray(noise), sys.argv[1], {"task": "test"})
except OSError as error:
    print("OSError", error.errno)
"""


def test_disk_full_during_a_save_keeps_the_previous_output_and_no_temp(tmp_path: Path) -> None:
    import subprocess
    import sys

    target = tmp_path / "out.png"
    target.write_bytes(b"previous output")
    result = subprocess.run([sys.executable, "-c", DISK_FULL_WRITER, str(target)], capture_output=True, text=True)
    assert result.stdout.startswith("OSError"), result.stderr
    assert target.read_bytes() == b"previous output"
    assert list(tmp_path.iterdir()) == [target]


def test_replacing_a_linked_folder_replaces_the_link_and_keeps_its_target(tmp_path: Path) -> None:
    real, new = tmp_path / "real", tmp_path / "new"
    real.mkdir()
    (real / "a").write_text("linked")
    new.mkdir()
    (new / "a").write_text("new")
    (tmp_path / "model").symlink_to(real)
    replace_dir(new, tmp_path / "model")
    assert (tmp_path / "model" / "a").read_text() == "new" and not (tmp_path / "model").is_symlink()
    assert (real / "a").read_text() == "linked"  # only the link was replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "real"]


def test_claim_and_temp_names_of_long_targets_fit_the_file_system(tmp_path: Path) -> None:
    """Issue 29 item 19: names derived from a 240-byte target were over NAME_MAX (255 bytes)."""
    import os

    from difftool.core.atomic import claim, claim_path, is_own_temp

    names = ["x" * 236 + ".png", "y" * 255, "\u00e9" * 127, "\u732b" * 85, "a.png"]
    claims = {claim_path(tmp_path / name).name for name in names}
    assert len(claims) == len(names) and all(len(os.fsencode(c)) <= 255 for c in claims)
    assert claim_path(tmp_path / "a.png").name == ".difftool-claim.a.png"  # short names as before
    assert claim_path(tmp_path / ("x" * 236 + "1.png")) != claim_path(tmp_path / ("x" * 236 + "2.png"))
    for name in names:
        temp = temp_name(name)
        assert len(os.fsencode(temp)) <= 255 and is_own_temp(temp) == os.getpid()
        target = tmp_path / name
        with claim(target) as mine:
            assert mine and claim_path(target).exists()
        atomic_write_bytes(target, b"data")
        assert target.read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no claim or temp left
