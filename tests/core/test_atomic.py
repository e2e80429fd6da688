from pathlib import Path

import pytest
from PIL import Image

from difftool.core.atomic import atomic_write, atomic_write_bytes
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
    import os
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
