"""Damaged or hostile safetensors files: one clear error each, read from the header alone."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from difftool.core.errors import ModelError
from difftool.core.safetensors_check import check_safetensors
from difftool.plugins.builtin.sd.checkpoint import load_state_dict
from difftool.plugins.builtin.upscalers import read_state_dict


def write(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_a_header_length_whose_low_byte_is_0x80_is_not_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    for padding in range(300):  # some header length in this range has 0x80 as its low byte
        save_file({"a": torch.zeros(1)}, str(path), metadata={"pad": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert check_safetensors(path) == {"a": (1,)}


def test_a_sound_file_passes_and_gives_shapes(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.int64)}, str(path))
    assert check_safetensors(path) == {"a": (2, 3), "b": (4,)}
    assert torch.equal(load_state_dict(path)["b"], torch.ones(4, dtype=torch.int64))


CASES = {
    "header length over the file size": (lambda p: write(p, {}, length=10_000), r"is incomplete: its header needs"),
    "absurd header length": (lambda p: write(p, {}, length=2**60), r"is invalid: it claims a \d+-byte header"),
    "truncated data": (lambda p: write(p, {"a": entry("F32", [4], 0, 16)}, b"\0" * 8), r"is incomplete: .*16 bytes"),
    "overlapping offsets": (
        lambda p: write(p, {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, b"\0" * 12),
        r"is invalid: tensors 'a' and 'b' overlap",
    ),
    "shape x dtype mismatch": (
        lambda p: write(p, {"a": entry("F16", [3, 3], 0, 8)}, b"\0" * 8),
        r"is invalid: tensor 'a' F16\[3, 3\] needs 18 bytes, its offsets span 8",
    ),
    "non-dict header": (lambda p: write(p, [1, 2, 3]), r"is invalid: its header is a list"),
    "header not JSON": (
        lambda p: p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{{"),
        r"is invalid: its header is not JSON",
    ),
    "pickle named .safetensors": (
        lambda p: p.write_bytes(pickle.dumps({"x": 1})),
        r"is invalid: it is a pickle / zip .*--allow-pickle",
    ),
    "Git LFS pointer": (
        lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"),
        r"is a Git LFS pointer.*git lfs pull",
    ),
    "empty file": (lambda p: p.write_bytes(b""), r"is invalid: 0 bytes is too short"),
    "unknown dtype": (lambda p: write(p, {"a": entry("F128", [1], 0, 16)}, b"\0" * 16), r"tensor 'a' has a malformed"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_damage_has_its_own_error(case: str, tmp_path: Path) -> None:
    make, message = CASES[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(ModelError, match=message):
        check_safetensors(path)
    with pytest.raises(ModelError, match=message):  # every loader goes through the check first
        load_state_dict(path)


def _raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


_A = json.dumps({"a": entry("F32", [2], 0, 8)}).encode()
ROUND_THREE = {
    "byte-order mark": (lambda p: _raw(p, b"\xef\xbb\xbf" + _A, b"\0" * 8), r"header starts with a byte-order mark"),
    "gap between tensors": (
        lambda p: write(p, {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)}, b"\0" * 20),
        r"is invalid: 4 unused bytes before tensor 'b'",
    ),
    "gap before the first": (lambda p: write(p, {"a": entry("F32", [2], 4, 12)}, b"\0" * 12), r"before tensor 'a'"),
    "trailing bytes": (lambda p: _raw(p, _A, b"\0" * 16), r"is invalid: 8 bytes after its last tensor"),
    "__metadata__ a list": (
        lambda p: write(p, {"__metadata__": [1], "a": entry("F32", [2], 0, 8)}, b"\0" * 8),
        r"its __metadata__ is not a mapping of strings",
    ),
    "__metadata__ value an int": (
        lambda p: write(p, {"__metadata__": {"k": 1}, "a": entry("F32", [2], 0, 8)}, b"\0" * 8),
        r"its __metadata__ is not a mapping of strings",
    ),
    "header 200,000 deep": (
        lambda p: _raw(p, b'{"__metadata__":' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
        r"its header is nested too deep",
    ),
}


@pytest.mark.parametrize("case", sorted(ROUND_THREE))
def test_what_the_safetensors_library_refuses_is_refused_first_in_one_line(case: str, tmp_path: Path) -> None:
    """Issue 29 item 17: these passed the check, then the upscaler path failed inside the safetensors library
    (or Python's JSON parser: RecursionError), blamed on the plugin."""
    make, message = ROUND_THREE[case]
    path = make(tmp_path / "bad.safetensors")
    for load in (check_safetensors, load_state_dict, read_state_dict):
        with pytest.raises(ModelError, match=message):
            load(path)
    write(path, {"__metadata__": {"k": "v"}, "b": entry("F32", [1], 8, 12), "a": entry("F32", [2], 0, 8)}, b"\0" * 12)
    assert check_safetensors(path) == {"a": (2,), "b": (1,)}  # tensors listed out of order still tile the data
