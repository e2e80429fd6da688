"""Inputs and outputs of a batch: expanding folders and globs, naming outputs (CLI, GUI, executors)."""

from __future__ import annotations

import glob
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from difftool.core.errors import ImageError, ParameterError
from difftool.core.images import SAVE_FORMATS, check_regular_file

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"})


@dataclass(frozen=True)
class BatchItem:
    """One input file; ``key`` is its path relative to the folder or glob it came from (names outputs, seeds)."""

    path: Path
    key: str


def shown(text: str) -> str:
    """``text`` printable on any stream: a file name in bytes that are not UTF-8 (held by Python with lone
    surrogates) is shown with those bytes escaped (``\\xff.png``) instead of failing the print."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def expand_inputs(specs: list[str]) -> list[BatchItem]:
    """Files, folders (their images, recursively) and glob patterns, in a stable sorted order."""
    items: list[BatchItem] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ImageError(
                    f"{spec}: the folder holds no images", f"use {', '.join(sorted(IMAGE_SUFFIXES))} files"
                )
            items += [BatchItem(p, p.relative_to(path).as_posix()) for p in files]
        elif path.exists():
            check_regular_file(path)  # a FIFO or device would block the read forever
            items.append(BatchItem(path, path.name))
        elif glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matches:
                raise ImageError(f"{spec}: the pattern matches no file", "check the pattern")
            items += [BatchItem(p, p.name) for p in matches]
        else:
            raise ImageError(f"{spec}: no such file", "check the path")
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ParameterError(f"two inputs would write the same output name ({dup})", "run them separately")
    return items


def output_is_file(output: str) -> bool:
    """The ``-o`` rule: an existing folder, or a path ending in ``/``, is a folder; a path whose suffix is
    an image format's (``.png``, ``.jpg``, ...; see :data:`IMAGE_SUFFIXES`), or any other existing
    path, is a file; anything else is a folder (created if needed)."""
    out = Path(output).expanduser()
    if output.endswith(("/", "\\")) or out.is_dir():
        return False
    return out.suffix.lower() in IMAGE_SUFFIXES or out.exists()


def check_output_file(output: str) -> None:
    """Refuse, before any work, an ``-o`` file difftool cannot write: a format it does not write, or
    an existing path that is not a regular file (``/dev/null``, a FIFO)."""
    out = Path(output).expanduser()
    if out.exists() and not out.is_file():
        raise ParameterError(f"-o {output} exists and is not a regular file", "pass a file path or a folder")
    if out.suffix.lower() not in SAVE_FORMATS:
        raise ParameterError(
            f"-o {output}: difftool does not write {out.suffix} files",
            f"use one of {', '.join(sorted(SAVE_FORMATS))}",
        )


def output_paths(
    items: list[BatchItem], output: str | None, task: str, count: int = 1, generated: bool = False
) -> list[list[Path]]:
    """Where each input's ``count`` outputs go.

    ``-o FILE.png`` with one input writes that file; ``-o DIR`` writes ``DIR/<key>.png``; no ``-o``
    writes ``<input stem>.<task>.png`` beside each input. Several outputs get ``-1``, ``-2``, ... suffixes.
    ``generated`` items (tasks without inputs) are named by their key: ``generate-SEED.png``.
    Inputs that differ only in their extension (``a.jpg``, ``a.png``) would share a name: those keep
    their extension in it (``a.jpg.png``, ``a.jpg.superres.png``). The names therefore depend on the
    run's inputs: adding ``a.png`` beside an already processed ``a.jpg`` renames the latter's output.
    """

    def numbered(base: Path) -> list[Path]:
        if count == 1:
            return [base]
        return [base.with_name(f"{base.stem}-{i + 1}{base.suffix}") for i in range(count)]

    if output is not None and output_is_file(output):
        check_output_file(output)
        if len(items) > 1:
            raise ParameterError(f"-o {output} is one file but there are {len(items)} inputs", "pass -o FOLDER")
        return [numbered(Path(output).expanduser())]
    if generated:  # named by their key: generate-SEED.png, in -o FOLDER or the current folder
        folder = Path(output).expanduser() if output is not None else None
        return [numbered(folder / item.path.name if folder else item.path) for item in items]

    def name(item: BatchItem, keep_suffix: bool) -> Path:
        if output is not None:
            key = Path(item.key)
            return Path(output).expanduser() / (f"{item.key}.png" if keep_suffix else key.with_suffix(".png"))
        stem = item.path.name if keep_suffix else item.path.stem
        return item.path.with_name(f"{stem}.{task}.png")

    plain = [name(item, False) for item in items]
    shared = {p for p, n in Counter(plain).items() if n > 1}
    bases = [name(item, True) if p in shared else p for item, p in zip(items, plain, strict=True)]
    if len(set(bases)) != len(bases):
        dup = next(p for p, n in Counter(bases).items() if n > 1)
        raise ParameterError(f"two inputs would write the same output {dup}", "run them separately")
    return [numbered(base) for base in bases]
