"""Inputs and outputs of a batch: expanding folders and globs, naming outputs (CLI, GUI, executors)."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from difftool.core.errors import ImageError, ParameterError
from difftool.core.images import SAVE_FORMATS

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"})


@dataclass(frozen=True)
class BatchItem:
    """One input file; ``key`` is its path relative to the folder or glob it came from (names outputs, seeds)."""

    path: Path
    key: str


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


def output_paths(
    items: list[BatchItem], output: str | None, task: str, count: int = 1, generated: bool = False
) -> list[list[Path]]:
    """Where each input's ``count`` outputs go.

    ``-o FILE.png`` with one input writes that file; ``-o DIR`` writes ``DIR/<key>.png``; no ``-o``
    writes ``<input stem>.<task>.png`` beside each input. Several outputs get ``-1``, ``-2``, ... suffixes.
    ``generated`` items (tasks without inputs) are named by their key: ``generate-SEED.png``.
    """

    def numbered(base: Path) -> list[Path]:
        if count == 1:
            return [base]
        return [base.with_name(f"{base.stem}-{i + 1}{base.suffix}") for i in range(count)]

    if output is not None:
        out = Path(output).expanduser()
        if out.suffix.lower() in SAVE_FORMATS and not out.is_dir():
            if len(items) > 1:
                raise ParameterError(f"-o {output} is one file but there are {len(items)} inputs", "pass -o FOLDER")
            return [numbered(out)]
        return [numbered((out / item.key).with_suffix(".png")) for item in items]
    if generated:
        return [numbered(item.path) for item in items]
    return [numbered(item.path.with_name(f"{item.path.stem}.{task}.png")) for item in items]
