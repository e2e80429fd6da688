"""One artifact cache for exported models, keyed by everything the artifact depends on.

``$DIFFTOOL_CACHE`` or ``~/.cache/difftool``. An entry is ``<kind>/<name>-<key>/`` holding the
artifact files and ``manifest.json`` (key components, file hashes, validation report). The key is a
hash of the components (weights hash, export options, versions, ...), so any change builds a new
entry. A new entry supersedes (removes, with a notice) only the entries it truly replaces: the same
name with every component equal except the versions it names (tool versions, format; for engines the
export they were built from), so the engines of other GPUs, precisions and profiles stay. An entry
another process uses or builds is never removed: each process holds a shared lock on every entry it
has used (``.<name>-<key>.use``) for its life, and removal needs both that and the build lock free.
An entry whose files do not match the hashes in its manifest (truncated, edited, or never recorded
by difftool) is rebuilt. Builds happen in a temp folder renamed into place under an exclusive file
lock, so two processes building the same artifact neither corrupt it nor build it twice.
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
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from difftool.core import phases
from difftool.core.atomic import file_sha256
from difftool.core.runtime import current

log = logging.getLogger("difftool")
MANIFEST = "manifest.json"
#: Components naming a tool's version or an entry's format: a new entry differing from an old one of the
#: same name only in these replaces it (the same model, exported or built again by newer tools).
VERSIONS = frozenset({"torch", "onnx", "onnxruntime", "tensorrt", "opset", "format"})


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
    entry = _hash_check(folder, rehash)
    if entry is None:
        hashed.pop(folder, None)
    else:
        hashed[folder] = (signature, entry)
    return entry


def _file_stat(path: Path) -> list[int]:
    """What a file's bytes cannot change without: its size, modification and change times, inode."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _hash_check(folder: Path, rehash: bool = False) -> Entry | None:
    """The entry if its files match the manifest: by their stat as recorded when they were hashed at build
    (a 15 GB SDXL engine is hashed once, not once per process), else (or with ``rehash``) by their SHA-256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    stats = manifest.get("stats")
    if not rehash and isinstance(stats, dict) and set(stats) == set(files):
        try:
            # ctime and the inode cannot be set back by hand: a same-size edit with a forged mtime shows
            if all(_file_stat(folder / name) == stats[name] for name in files):
                return Entry(folder, manifest)
        except OSError:
            return None
    for name, digest in files.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != digest:
            return None
    return Entry(folder, manifest)


def _lock_file(path: Path) -> IO[str]:
    """The lock file ``path``, opened (and its folder made); an unwritable cache is the user's to fix."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a+")  # noqa: SIM115 - the caller closes it (or keeps it for the lock's life)
    except OSError as error:  # read-only, permissions, a file where a folder should be
        from difftool.core.errors import OutputError

        raise OutputError(
            f"the artifact cache cannot be written at {path.parent} ({error.strerror or error})",
            "point DIFFTOOL_CACHE at a writable folder",
        ) from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with _lock_file(path) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: The use locks this process holds (shared, one handle per entry, kept for the process's life).
_IN_USE: dict[Path, IO[str]] = {}
_IN_USE_LOCK = threading.Lock()


def _hold(path: Path) -> None:
    """Hold a shared lock on ``path`` for the rest of the process: the entry is in use here.

    Taken before the entry is verified, so an entry another process is removing (it holds the lock
    exclusively) is waited for, then found missing and rebuilt, never loaded half-deleted.
    """
    with _IN_USE_LOCK:
        if path in _IN_USE:
            return
        handle = _lock_file(path)  # kept open: the lock lives as long as the handle
        fcntl.flock(handle, fcntl.LOCK_SH)
        _IN_USE[path] = handle


def _release(path: Path) -> None:
    with _IN_USE_LOCK:
        handle = _IN_USE.pop(path, None)
    if handle is not None:
        handle.close()  # closing the last handle releases the flock


@contextlib.contextmanager
def _free(*paths: Path) -> Iterator[bool]:
    """Lock every ``path`` exclusively without waiting; yields whether all were free (no other holder)."""
    handles = []
    try:
        for path in paths:
            handle = open(path, "a+")  # noqa: SIM115 - closed below
            handles.append(handle)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
        yield True
    finally:
        for handle in handles:
            handle.close()


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
        replaces: Collection[str] = VERSIONS,
    ) -> Entry:
        """The verified entry for ``components``, building it with ``build(folder)`` if needed.

        ``build`` writes its files into the (temporary) folder and returns extra manifest fields
        (the validation report). Every file it writes is hashed into the manifest. A new entry removes
        the entries of ``name`` that differ from it only in the components ``replaces`` names.
        """
        key = cache_key(components)
        target = self.folder(kind, name, key)
        _hold(self._use_lock(target))
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
                written = [p for p in sorted(tmp.iterdir()) if p.is_file()]
                manifest = {
                    "kind": kind,
                    "name": name,
                    "key": key,
                    "components": dict(components),
                    **extra,
                    "files": {p.name: file_sha256(p) for p in written},
                    # hashed once, here; later processes check these (`difftool cache verify` rehashes)
                    "stats": {p.name: _file_stat(p) for p in written},
                }
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        entry = _verified(target)
        assert entry is not None
        self._remove_superseded(kind, name, entry, replaces)
        return entry

    def find(self, kind: str, name: str) -> list[Entry]:
        """The verified entries of ``name`` whatever their key, newest first (held for use, as built ones)."""
        folders = [f for f in (self.root / kind).glob(f"{name}-*") if f.is_dir() and not f.name.startswith(".")]
        found = []
        for folder in sorted(folders, key=lambda f: f.stat().st_mtime, reverse=True):
            _hold(self._use_lock(folder))  # before verifying, as get_or_build: never one half-deleted
            entry = _verified(folder)
            if entry is not None and entry.manifest.get("name") == name:
                found.append(entry)
        return found

    @staticmethod
    def _use_lock(folder: Path) -> Path:
        return folder.parent / f".{folder.name}.use"

    @staticmethod
    def _build_lock(folder: Path) -> Path:
        return folder.parent / f".{folder.name}.lock"

    def _remove_superseded(self, kind: str, name: str, keep: Entry, replaces: Collection[str]) -> None:
        """Remove the entries ``keep`` replaces: ``name``'s, equal in every component outside ``replaces``.

        Never by name alone (the engines of another GPU, precision or profile share the name), never
        one missing a component ``keep`` has (an older format: it cannot be told apart), and never one
        another process uses or builds (its use or build lock is taken).
        """
        ours = keep.manifest.get("components", {})
        identity = {k: v for k, v in json.loads(json.dumps(ours, default=str)).items() if k not in replaces}
        for other in (self.root / kind).glob(f"{name}-*"):
            if other == keep.path or not other.is_dir():
                continue
            try:
                manifest = json.loads((other / MANIFEST).read_text())  # only folders we made
            except (OSError, ValueError):
                continue
            theirs = manifest.get("components")
            if manifest.get("name") != name or not isinstance(theirs, dict):
                continue
            if any(k not in theirs or theirs[k] != v for k, v in identity.items()):
                continue  # another GPU, precision, profile, model...: not replaced
            _release(self._use_lock(other))  # this process moves on to the new entry
            with _free(self._use_lock(other), self._build_lock(other)) as free:
                if not free:
                    log.info("keeping superseded %s %s: another process is using it", kind, other.name)
                    continue
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
        """Delete every entry: real folders holding a manifest this cache wrote, nothing else (a symlink placed
        in the cache is neither followed nor counted); returns how many are gone."""
        entries = [
            folder for folder, _ in self.entries() if not folder.is_symlink() and (folder / MANIFEST).is_file()
        ]
        for folder in entries:
            shutil.rmtree(folder, ignore_errors=True)
        return sum(not folder.exists() for folder in entries)
