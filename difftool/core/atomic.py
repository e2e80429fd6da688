"""File helpers. Atomic writes: a temp file in the target's folder, fsync, then ``os.replace``.

Readers see the old file or the new one, never half of one; a failure leaves no temp file behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

#: Temp files are named ``.difftool-<pid>-<nonce>-<tag>.<target>.tmp``: ``tag`` is a hash of the rest of
#: the name under a difftool-specific prefix, so :func:`clean_stale_temps` can tell a file is one of ours.
#: A user's file that merely looks like a temp name (``.thesis.2023.final.tmp``) never matches.
_TEMP_NAME = re.compile(r"^\.difftool-(\d+)-([0-9a-f]{8})-([0-9a-f]{16})\.(.+)\.tmp$")


def _temp_tag(pid: int, nonce: str, target_name: str) -> str:
    # surrogateescape: a target named in bytes that are not UTF-8 is hashed as those bytes
    text = f"difftool-temp:{pid}:{nonce}:{target_name}".encode("utf-8", "surrogateescape")
    return hashlib.sha256(text).hexdigest()[:16]


#: Longest file name (bytes) most file systems take (``NAME_MAX``): every name difftool derives fits it.
NAME_MAX = 255


def fitted(prefix: str, name: str, suffix: str = "") -> str:
    """``prefix + name + suffix``, or, if that is over :data:`NAME_MAX` bytes, with ``name`` cut short and a
    hash of all of it added (``<start of name>~<16 hex>``): still one name per ``name``, and it always fits."""
    whole = f"{prefix}{name}{suffix}"
    if len(os.fsencode(whole)) <= NAME_MAX:
        return whole
    raw = os.fsencode(name)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    room = NAME_MAX - len(os.fsencode(f"{prefix}~{digest}{suffix}"))
    # os.fsdecode maps a UTF-8 sequence cut in half to surrogates, which fsencode turns back into those bytes.
    return f"{prefix}{os.fsdecode(raw[: max(room, 0)])}~{digest}{suffix}"


def temp_name(target_name: str) -> str:
    """A fresh temp file name for ``target_name``, provably difftool's (see :func:`is_own_temp`); a long
    ``target_name`` is shortened in it (:func:`fitted`), so the temp file can be made whenever the target can."""
    pid, nonce = os.getpid(), secrets.token_hex(4)
    head = f".difftool-{pid}-{nonce}-{'0' * 16}."  # the tag's length, to fit the name around it
    shown = fitted(head, target_name, ".tmp")[len(head) : -len(".tmp")]
    return f".difftool-{pid}-{nonce}-{_temp_tag(pid, nonce, shown)}.{shown}.tmp"


def is_own_temp(name: str) -> int | None:
    """The writer's pid if ``name`` is a temp name :func:`temp_name` made, else ``None``."""
    match = _TEMP_NAME.match(name)
    if not match or match.group(3) != _temp_tag(int(match.group(1)), match.group(2), match.group(4)):
        return None
    return int(match.group(1))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path``; on a clean exit it replaces ``path`` in one step."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: the name is new, so this process created the file it may later delete.
    tmp = target.parent / temp_name(target.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    # The file starts 0600; give the result the mode a plain open() would (or the replaced file's).
    umask = os.umask(0)
    os.umask(umask)
    permissions = target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~umask
    os.fchmod(fd, permissions)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temp files that :func:`atomic_write` left in ``folder`` when its process was killed.

    Only regular files whose name carries difftool's keyed tag (:func:`is_own_temp`) and whose writer
    (the pid in the name) no longer runs on this machine are removed; everything else is left alone.
    """
    removed = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        pid = is_own_temp(path.name)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):  # another run may be cleaning the same folder
            if not stat.S_ISREG(path.lstat().st_mode):  # never follow a link or touch a special file
                continue
            path.unlink()
            removed.append(path)
    return removed


def replace_dir(tmp: Path, target: Path) -> Path:
    """Move the finished folder ``tmp`` to ``target``, replacing an existing one with two renames.

    The old target (a folder, or a link to one) is first renamed to a fresh random name, so the only
    tree this deletes is the one it moved out of the way (never a user's ``.name.old``); if the second
    rename fails, the old target is put back.
    """
    if not (target.exists() or target.is_symlink()):
        os.replace(tmp, target)
        return target
    old = target.with_name(f".difftool-old-{secrets.token_hex(8)}-{target.name}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    if old.is_symlink() or not old.is_dir():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)
    return target


#: The first bytes of a claim file: a claim file holding anything else is not ours and never deleted.
CLAIM_MAGIC = b"difftool-claim\n"


def claim_path(target: Path) -> Path:
    """``.difftool-claim.<name>`` beside ``target``; for a long name, shortened with a hash (:func:`fitted`)."""
    return target.with_name(fitted(".difftool-claim.", target.name))


@contextlib.contextmanager
def claim(target: str | os.PathLike[str]) -> Iterator[bool]:
    """Claim the making of ``target`` among processes: yields ``True`` if this process holds the claim,
    ``False`` if another live process does (nothing waits).

    The claim is an exclusive ``flock`` on ``.difftool-claim.<name>`` beside the target; the kernel
    drops it when its holder dies, so a killed run never blocks the next one. The claim file is
    removed afterwards only if it carries :data:`CLAIM_MAGIC` (made by difftool).
    """
    path = claim_path(Path(target))
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    while True:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                fd = os.open(path, flags)
            except FileNotFoundError:
                continue  # its holder removed it between our two opens
        else:
            try:
                os.write(fd, CLAIM_MAGIC)
            except BaseException:  # disk full: remove the file this call made, leave nothing behind
                os.close(fd)
                os.unlink(path)
                raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            held = True
        except BaseException:  # ENOLCK on some network filesystems
            os.close(fd)
            raise
        else:
            held = False
        if held:
            break
        try:  # the holder before us may have unlinked the file we locked: then claim the new one
            current = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    if held:
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            if os.pread(fd, len(CLAIM_MAGIC) + 1, 0) == CLAIM_MAGIC:
                os.unlink(path)
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
