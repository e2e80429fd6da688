"""Textual-inversion embeddings, triggered by their name in a prompt, as in A1111.

An embedding is a few learned token vectors saved under a name (its file's stem, e.g.
``EasyNegative.safetensors``). Where the prompt's tokens spell that name, the vectors take the
places of those tokens (:mod:`prompt_chunks` places them; :func:`injected` writes them into the text
encoder's token embeddings). Files are found in ``embeddings/`` (and ``models/embeddings/``) under the
model roots, or passed with ``--embedding FILE``; only those named in a prompt are loaded.

Formats: A1111's ``.pt`` (``string_to_param``, only with ``--allow-pickle``, through the safe loader)
and ``.safetensors`` (``emb_params``), diffusers' one-tensor files, and SDXL's ``clip_l`` / ``clip_g``
pairs. diffusers' ``load_textual_inversion`` needs a pipeline object and new tokenizer entries; this
works on token ids, so the same prompt text means the same thing on every backend's text encoder.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftool.core.atomic import file_sha256
from difftool.core.errors import ModelError, ParameterError
from difftool.core.params import Resolver
from difftool.core.runtime import current
from difftool.plugins.builtin.sd import checkpoint

EMBEDDING_FOLDERS = ("embeddings", "models/embeddings")
SUFFIXES = (".safetensors", ".pt", ".bin")
log = logging.getLogger("difftool")


@dataclass(frozen=True)
class Embedding:
    name: str
    path: Path
    #: Text encoder width -> (vectors, width): SD 1.x 768, SD 2.x 1024, SDXL 768 (clip_l) and 1280 (clip_g).
    by_width: dict[int, Any]
    sha256: str

    @property
    def vectors(self) -> int:
        return int(next(iter(self.by_width.values())).shape[0])

    def fits(self, widths: Sequence[int]) -> bool:
        return all(w in self.by_width for w in widths)

    def part(self, start: int, stop: int) -> Embedding:
        """Vectors ``start:stop`` of this embedding: one chunk's share of an embedding longer than a chunk."""
        return Embedding(self.name, self.path, {w: v[start:stop] for w, v in self.by_width.items()}, self.sha256)


def load_embedding(path: Path, *, allow_pickle: bool = False) -> Embedding:
    """Read one embedding file (cached by path and modification time)."""
    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    cache: dict[Any, Embedding] = current().cache("sd-embeddings", dict)
    if key in cache:
        return cache[key]
    if checkpoint.is_pickle(path):
        data = checkpoint.load_pickle(path, allow_pickle=allow_pickle)
        params = data.get("string_to_param") if isinstance(data, dict) else None
        tensors = dict(params) if isinstance(params, dict) else data if isinstance(data, dict) else {}
    else:
        tensors = checkpoint.load_state_dict(path)
    tensors = {k: v for k, v in tensors.items() if hasattr(v, "shape")}
    if "clip_l" in tensors and "clip_g" in tensors:  # SDXL: one set of vectors per text encoder
        chosen = [tensors["clip_l"], tensors["clip_g"]]
    elif len(tensors) == 1:
        chosen = list(tensors.values())
    elif "emb_params" in tensors:
        chosen = [tensors["emb_params"]]
    else:
        raise ModelError(
            f"{path.name} is not a textual-inversion embedding (tensors: {', '.join(list(tensors)[:4]) or 'none'})",
            "pass an A1111 or diffusers embedding file",
        )
    by_width = {}
    for tensor in chosen:
        if tensor.ndim == 0 or tensor.numel() == 0:
            raise ModelError(f"embedding {path.name} holds no vectors", "pass a trained embedding file")
        vectors = tensor.detach().float().reshape(-1, tensor.shape[-1])
        if not bool(vectors.isfinite().all()):  # else every image it touches comes out NaN, blamed on the VAE
            raise ModelError(f"embedding {path.name} holds NaN or Inf values", "re-download or retrain it")
        by_width[int(vectors.shape[1])] = vectors
    embedding = Embedding(path.stem, path, by_width, file_sha256(path))
    cache[key] = embedding
    return embedding


class EmbeddingFiles(str):
    """``--embedding``'s parsed value: the text as given (records show it) and :attr:`paths`, its files, which
    the preflight's resolver checks (:class:`~difftool.core.params.Resolvable`; a server: its path policy)."""

    paths: tuple[Path, ...]

    def __new__(cls, text: str, paths: Sequence[Path] | None = None) -> EmbeddingFiles:
        value = super().__new__(cls, text)
        items = [item.strip() for item in text.split(",") if item.strip()]
        value.paths = tuple(paths) if paths is not None else tuple(Path(item).expanduser() for item in items)
        return value

    def __reduce__(self) -> tuple[object, ...]:  # picklable for Ray and worker processes
        return (EmbeddingFiles, (str(self), self.paths))

    def resolved(self, resolver: Resolver) -> EmbeddingFiles:
        items = [item.strip() for item in self.split(",") if item.strip()]
        return EmbeddingFiles(str(self), [resolver.file(item, "embedding file") for item in items])


def parse_embedding_files(value: Any) -> EmbeddingFiles:
    """``a.pt,b.safetensors`` -> its files (comma-separated), the one parser of ``--embedding``."""
    if isinstance(value, EmbeddingFiles):
        return value
    if not isinstance(value, (str, Path)):
        raise ParameterError(f"--embedding {str(value)[:80]!r} is not file names", "pass --embedding FILE[,FILE]")
    return EmbeddingFiles(str(value))


def candidates(extra: str | None) -> dict[str, Path]:
    """Embedding files by name: ``--embedding`` files (comma-separated) over the model roots' folders."""
    from difftool.plugins.builtin.models import model_roots

    found: dict[str, Path] = {}
    for root in model_roots():
        for sub in EMBEDDING_FOLDERS:
            folder = root / sub
            if folder.is_dir():
                for path in sorted(folder.iterdir()):
                    if path.is_file() and path.suffix.lower() in SUFFIXES:
                        found.setdefault(path.stem, path)
    for path in parse_embedding_files(extra or "").paths:  # resolved by the preflight; checked again here
        if not path.is_file():
            raise ParameterError(f"embedding file {path} does not exist", "pass --embedding FILE with an existing file")
        found[path.stem] = path
    return found


class EmbeddingFinder:
    """Finds the embeddings a prompt names, by token ids (as A1111 does: CLIP's tokenizer lowercases)."""

    def __init__(self, tokenizer: Any, embeddings: Sequence[Embedding]) -> None:
        self.by_first: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        for embedding in embeddings:
            ids = tuple(tokenizer(embedding.name, add_special_tokens=False).input_ids)
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, embedding))
        for matches in self.by_first.values():
            matches.sort(key=lambda m: -len(m[0]))  # the longest name wins

    def __call__(self, ids: Sequence[int], position: int) -> tuple[Embedding | None, int]:
        for name_ids, embedding in self.by_first.get(ids[position], ()):
            if tuple(ids[position : position + len(name_ids)]) == name_ids:
                return embedding, len(name_ids)
        return None, 0


def named_in(texts: Sequence[str], extra: str | None, widths: Sequence[int], allow_pickle: bool) -> list[Embedding]:
    """The embeddings whose name appears in ``texts`` and that fit text encoders of ``widths``."""
    words = {w.lower().strip(".-") for text in texts for w in re.findall(r"[\w\-.]+", text)}  # "... EasyNegative."
    chosen = []
    for name, path in candidates(extra).items():
        if name.lower() not in words:
            continue
        embedding = load_embedding(path, allow_pickle=allow_pickle)
        if embedding.fits(widths):
            chosen.append(embedding)
        else:
            have = "/".join(map(str, sorted(embedding.by_width)))
            log.warning(
                "embedding %s is for %s-wide text encoders, this model's are %s: its name is read as words",
                name,
                have,
                "/".join(map(str, widths)),
            )
    return chosen


@contextlib.contextmanager
def injected(encoder: Any, chunks: Sequence[Any]) -> Iterator[None]:
    """While the block runs ``encoder`` on ``chunks`` (one row each), their embeddings' vectors replace the
    placeholder tokens' embeddings (a forward hook on the token embedding layer)."""
    placed = [(row, offset, e) for row, chunk in enumerate(chunks) for offset, e in chunk.embeddings]
    if not placed:
        yield
        return
    layer = getattr(encoder, "text_model", encoder).embeddings.token_embedding

    def hook(module: Any, inputs: Any, output: Any) -> Any:
        output = output.clone()
        for row, offset, embedding in placed:
            vectors = embedding.by_width[int(output.shape[-1])]
            output[row, offset : offset + vectors.shape[0]] = vectors.to(output.device, output.dtype)
        return output

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def record(embeddings: Sequence[Embedding]) -> dict[str, str]:
    """A1111's ``TI hashes`` metadata field."""
    if not embeddings:
        return {}
    return {"ti_hashes": ", ".join(f"{e.name}: {e.sha256[:12]}" for e in embeddings)}
