"""Check a safetensors file's structure before any library allocates memory for it.

The format: 8 bytes little-endian header length N, N bytes of JSON ``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}``, then the data. A damaged or hostile file can
claim a huge header, offsets past the end, overlapping tensors or sizes that do not match the
shape; each gets one clear error here, reading only the header (capped), never the data.
Written by hand because the safetensors library reports these cases with low-level messages (or,
for some, only when the tensor is read).
"""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path

from difftool.core.errors import ModelError

#: Larger headers are refused outright (real checkpoints have headers well under 10 MB).
MAX_HEADER_BYTES = 100 * 2**20
ITEM_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def check_safetensors(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape if ``path`` is a structurally sound safetensors file, else a :class:`ModelError`.

    "invalid" errors mean the file is not safetensors (or is corrupt); "incomplete" means it was cut
    short (an interrupted download or copy).
    """
    path = Path(path)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):  # opening a FIFO blocks until a writer comes: maybe never
        raise ModelError(f"{path.name} is not a regular file (a pipe, device or socket)", "pass a model file")
    size = info.st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if (head + handle.read(24)).startswith(b"version https://git-lfs"):
            raise ModelError(f"{path.name} is a Git LFS pointer, not the weights", "run `git lfs pull` to fetch it")
        if len(head) < 8:
            raise ModelError(f"{path.name} is invalid: {size} bytes is too short for a safetensors file", _FIX)
        length = int.from_bytes(head, "little")
        # A pickle (0x80 + protocol) or zip ("PK") read as a length is absurd; only then name the format.
        if (length > MAX_HEADER_BYTES or 8 + length > size) and (head[:1] == b"\x80" or head[:2] == b"PK"):
            raise ModelError(
                f"{path.name} is invalid: it is a pickle / zip (a .ckpt renamed to .safetensors?)",
                "convert it with a tool you trust, or load the original .ckpt with --allow-pickle",
            )
        if length > MAX_HEADER_BYTES:
            raise ModelError(f"{path.name} is invalid: it claims a {length}-byte header", _FIX)
        if 8 + length > size:
            raise ModelError(
                f"{path.name} is incomplete: its header needs {length} bytes but the file has {size - 8}", _RETRY
            )
        handle.seek(8)
        raw = handle.read(length)
    if raw.startswith(b"\xef\xbb\xbf"):  # json.loads(bytes) would skip it; the safetensors library does not
        raise ModelError(f"{path.name} is invalid: its header starts with a byte-order mark", _FIX)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{path.name} is invalid: its header is not JSON", _FIX) from None
    except RecursionError:  # "[[[[..." 200,000 deep: Python's parser gives up; no real header nests past 3
        raise ModelError(f"{path.name} is invalid: its header is nested too deep", _FIX) from None
    if not isinstance(header, dict):
        raise ModelError(f"{path.name} is invalid: its header is a {type(header).__name__}, not a mapping", _FIX)
    data_size = size - 8 - length
    spans, shapes = [], {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ModelError(f"{path.name} is invalid: its __metadata__ is not a mapping of strings", _FIX)
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ModelError(f"{path.name} is invalid: tensor {name!r} lacks dtype/shape/data_offsets", _FIX)
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        valid_shape = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        valid_offsets = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        if dtype not in ITEM_SIZES or not valid_shape or not valid_offsets or not 0 <= offsets[0] <= offsets[1]:
            raise ModelError(f"{path.name} is invalid: tensor {name!r} has a malformed entry", _FIX)
        expected = math.prod(shape) * ITEM_SIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise ModelError(
                f"{path.name} is invalid: tensor {name!r} {dtype}{shape} needs {expected} bytes, "
                f"its offsets span {offsets[1] - offsets[0]}",
                _FIX,
            )
        spans.append((offsets[0], offsets[1], name))
        shapes[name] = tuple(shape)
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise ModelError(f"{path.name} is invalid: tensors {first!r} and {second!r} overlap", _FIX)
    needed = spans[-1][1] if spans else 0
    if needed > data_size:
        raise ModelError(f"{path.name} is incomplete: its tensors need {needed} bytes, it holds {data_size}", _RETRY)
    # The tensors tile the data exactly, from its first byte to its last, as the safetensors library demands.
    previous = 0
    for begin, end, name in spans:
        if begin != previous:
            raise ModelError(f"{path.name} is invalid: {begin - previous} unused bytes before tensor {name!r}", _FIX)
        previous = end
    if needed < data_size:
        raise ModelError(f"{path.name} is invalid: {data_size - needed} bytes after its last tensor", _FIX)
    return shapes


_FIX = "re-download or re-export the file"
_RETRY = "the download or copy was cut short: fetch the file again"
