"""One artifact cache for exported models, keyed by everything the artifact depends on.

``$DIFFTOOL_CACHE`` or ``~/.cache/difftool``. An entry is ``<kind>/<name>-<key>/`` holding the
artifact files and ``manifest.json`` (key components, file hashes, validation report). The key is a
hash of the components (weights hash, export options, versions, ...), so any change builds a new
entry, and the superseded entries of the same name are removed with a notice. An entry whose files do
not match the hashes in its manifest (truncated, edited, or never recorded by difftool) is rebuilt.
Builds happen in a temp folder renamed into place under an exclusive file lock, so two processes
building the same artifact neither corrupt it nor build it twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftool.core.atomic import file_sha256

log = logging.getLogger("difftool")
MANIFEST = "manifest.json"


def cache_root() -> Path:
    return Path(os.environ.get("DIFFTOOL_CACHE") or Path.home() / ".cache" / "difftool")


def cache_key(components: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Entry:
    path: Path
    manifest: dict[str, Any]

    @property
    def files(self) -> dict[str, str]:
        return self.manifest.get("files", {})

    def file(self, name: str) -> Path:
        return self.path / name


def _verified(folder: Path) -> Entry | None:
    """The entry in ``folder`` if its manifest is readable and every file matches its recorded hash."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, digest in files.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != digest:
            return None
    return Entry(folder, manifest)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ArtifactCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root()

    def folder(self, kind: str, name: str, key: str) -> Path:
        return self.root / kind / f"{name}-{key}"

    def get_or_build(
        self,
        kind: str,
        name: str,
        components: Mapping[str, Any],
        build: Callable[[Path], dict[str, Any]],
    ) -> Entry:
        """The verified entry for ``components``, building it with ``build(folder)`` if needed.

        ``build`` writes its files into the (temporary) folder and returns extra manifest fields
        (the validation report). Every file it writes is hashed into the manifest.
        """
        key = cache_key(components)
        target = self.folder(kind, name, key)
        entry = _verified(target)
        if entry is not None:
            return entry
        with _locked(self.root / kind / f".{name}-{key}.lock"):
            entry = _verified(target)  # another process may have built it while we waited
            if entry is not None:
                return entry
            if target.exists():
                log.warning("cached %s %s failed verification; rebuilding it", kind, target.name)
                shutil.rmtree(target)
            else:
                log.warning("building %s for %s (first use; cached in %s)", kind, name, target.parent)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
            try:
                extra = build(tmp)
                files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
                manifest = {
                    "kind": kind,
                    "name": name,
                    "key": key,
                    "components": dict(components),
                    **extra,
                    "files": files,
                }
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._remove_superseded(kind, name, keep=target)
        entry = _verified(target)
        assert entry is not None
        return entry

    def _remove_superseded(self, kind: str, name: str, keep: Path) -> None:
        for other in (self.root / kind).glob(f"{name}-*"):
            if other != keep and other.is_dir():
                log.warning("removing superseded %s %s", kind, other.name)
                shutil.rmtree(other, ignore_errors=True)

    def entries(self) -> list[tuple[Path, bool]]:
        """Every entry folder and whether it verifies."""
        if not self.root.is_dir():
            return []
        return [
            (folder, _verified(folder) is not None)
            for kind in sorted(self.root.iterdir())
            if kind.is_dir()
            for folder in sorted(kind.iterdir())
            if folder.is_dir() and not folder.name.startswith(".")
        ]

    def clear(self) -> int:
        entries = self.entries()
        for folder, _ in entries:
            shutil.rmtree(folder, ignore_errors=True)
        return len(entries)
