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
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftool.core import phases
from difftool.core.atomic import file_sha256
from difftool.core.runtime import current

log = logging.getLogger("difftool")
MANIFEST = "manifest.json"


def cache_root() -> Path:
    """``$DIFFTOOL_CACHE`` or ``~/.cache/difftool``; a :class:`ModelError` naming the fix if it is not a folder."""
    from difftool.core.errors import ModelError

    root = Path(os.environ.get("DIFFTOOL_CACHE") or Path.home() / ".cache" / "difftool").expanduser()
    if root.exists() and not root.is_dir():
        raise ModelError(
            f"the artifact cache {root} is a file, not a folder",
            "point DIFFTOOL_CACHE at a folder (or unset it for ~/.cache/difftool)",
        )
    return root


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


#: Entries this process has hashed, with the files' stat at the time: a run reuses an export many times
#: (every image of a folder job), and hashing gigabytes each time would cost seconds per image.


def _stat_signature(folder: Path) -> tuple[Any, ...]:
    # ctime changes on any write or utime, so a same-size replacement with a forged mtime still shows.
    try:
        stats = [(p.name, p.stat()) for p in folder.iterdir()]
    except OSError:
        return ()
    return tuple(sorted((n, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino) for n, s in stats))


def _verified(folder: Path, rehash: bool = False) -> Entry | None:
    """The entry in ``folder`` if its manifest is readable and every file matches its recorded hash.

    Files hashed earlier in this process and unchanged since (same size, times and inode) are not
    hashed again unless ``rehash``.
    """
    signature = _stat_signature(folder)
    hashed: dict[Path, tuple[tuple[Any, ...], Entry]] = current().cache("artifact-hashes", dict)
    known = hashed.get(folder)
    if not rehash and known is not None and signature and known[0] == signature:
        return known[1]
    entry = _hash_check(folder)
    if entry is None:
        hashed.pop(folder, None)
    else:
        hashed[folder] = (signature, entry)
    return entry


def _hash_check(folder: Path) -> Entry | None:
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


class Recent:
    """The last ``size`` objects made, by key: ONNX Runtime sessions and TensorRT engines are slow to
    create and hold a model's weights, so a run reuses the previous run's instead of loading again."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()  # outside the lock: loading can take long and may fail
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


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
            phases.announce(f"building {kind} for {name} (first use; cached after)")
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
            if other != keep and other.is_dir() and (other / MANIFEST).is_file():  # only folders we made
                log.warning("removing superseded %s %s", kind, other.name)
                shutil.rmtree(other, ignore_errors=True)

    def entries(self) -> list[tuple[Path, bool]]:
        """Every entry folder and whether it verifies."""
        if not self.root.is_dir():
            return []
        return [
            (folder, _verified(folder, rehash=True) is not None)  # `cache verify` hashes every byte
            for kind in sorted(self.root.iterdir())
            if kind.is_dir()
            for folder in sorted(kind.iterdir())
            if folder.is_dir() and not folder.name.startswith(".")
        ]

    def clear(self) -> int:
        """Delete every entry: folders holding a manifest this cache wrote, nothing else."""
        entries = [folder for folder, _ in self.entries() if (folder / MANIFEST).is_file()]
        for folder in entries:
            shutil.rmtree(folder, ignore_errors=True)
        return len(entries)
