"""Where a server keeps its result files, and how a restart finds the folders of servers that were killed.

Each server makes a private temporary folder and keeps an ``flock`` on a marker file in it for its life; a
starting server removes the folders whose marker it can lock: their servers are gone (SIGKILL included).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("difftool.serve")

#: The file in a result folder that proves ``difftool serve`` made it; the server holds an ``flock`` on it
#: for its whole life (the kernel drops it when the process dies, even by SIGKILL).
RESULTS_MARKER = ".difftool-serve-results"
_MARKER_MAGIC = b"difftool serve results\n"
_OPEN = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


def make_results_dir(root: str | None = None) -> tuple[Path, int]:
    """A fresh result folder and the open, locked descriptor of its marker (close it after removing the folder)."""
    folder = Path(tempfile.mkdtemp(prefix="difftool-serve-", dir=root))
    fd = os.open(folder / RESULTS_MARKER, _OPEN | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, _MARKER_MAGIC)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return folder, fd


def remove_orphaned_results(root: str | None = None) -> list[Path]:
    """Remove the result folders of servers that died without cleaning up (SIGKILL), and return them.

    Only folders this code can prove it made: a real folder named ``difftool-serve-*`` holding a regular marker
    file that starts with the magic line and whose lock no live process holds. Anything else is left alone.
    """
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob("difftool-serve-*"):
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            fd = os.open(folder / RESULTS_MARKER, _OPEN)
        except OSError:  # no marker (another tool's folder, or an older difftool's): not provably ours
            continue
        try:
            if os.read(fd, len(_MARKER_MAGIC) + 1) != _MARKER_MAGIC:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its server is alive
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d result folder(s) left by servers that were killed", len(removed))
    return removed
