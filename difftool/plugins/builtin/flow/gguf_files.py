"""GGUF transformer files (city96's Flux / SD 3.5 quantisations, ComfyUI-GGUF's ``models/unet``).

The header is read here, without the ``gguf`` package, so a ``.gguf`` model is detected (and listed) whether
or not the optional extra is installed; loading needs it (``pip install 'difftool[gguf]'``). Weights stay
quantised in memory: diffusers' GGUF loader (``GGUFQuantizationConfig``, ``from_single_file``) puts
``GGUFLinear`` layers in place, which dequantise one layer at a time in the run's precision.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from difftool.core.errors import ModelError

if TYPE_CHECKING:
    import torch

    from difftool.plugins.builtin.flow.families import FlowFamily

MAGIC = b"GGUF"
#: GGUF metadata value types -> struct format (8: string, 9: array are read apart).
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
INSTALL = "install the optional extra: pip install 'difftool[gguf]' (or pip install gguf)"


def _read(f: IO[bytes], fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise ModelError(f"{f.name} is a truncated GGUF file", "download it again")
    return struct.unpack("<" + fmt, data)[0]


def _string(f: IO[bytes]) -> str:
    return f.read(_read(f, "Q")).decode("utf-8", "replace")


def _skip_value(f: IO[bytes], kind: int) -> None:
    if kind == 8:
        _string(f)
    elif kind == 9:
        item, count = _read(f, "I"), _read(f, "Q")
        for _ in range(count):
            _skip_value(f, item)
    elif kind in SCALARS:
        _read(f, SCALARS[kind])
    else:
        raise ModelError(f"{f.name}: unknown GGUF value type {kind}", "pass a GGUF file written by gguf-py")


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and (PyTorch-order) shapes from a GGUF header; raises ModelError if it is not one."""
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise ModelError(f"{path.name} is not a GGUF file", "pass a .gguf or .safetensors file")
        version = _read(f, "I")
        if version < 2:
            raise ModelError(f"{path.name} is GGUF version {version}", "pass a GGUF v2 or v3 file")
        tensors, fields = _read(f, "Q"), _read(f, "Q")
        for _ in range(fields):
            _string(f)
            _skip_value(f, _read(f, "I"))
        shapes = {}
        for _ in range(tensors):
            name = _string(f)
            dims = [_read(f, "Q") for _ in range(_read(f, "I"))]
            _read(f, "I"), _read(f, "Q")  # type, offset
            shapes[name] = tuple(reversed(dims))  # GGML lists the fastest-moving dimension first
    return shapes


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors: quantised ones as diffusers' ``GGUFParameter`` (still quantised), others plain."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError(f"{path.name} is a GGUF file and the gguf package is not installed", INSTALL) from None
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    try:
        return load_gguf_checkpoint(str(path))
    except ValueError as exc:  # an unsupported quantisation type
        raise ModelError(f"{path.name}: {str(exc).strip().splitlines()[0]}", "use a Q8_0, Q5/Q4 (K) file") from None


def logical_shape(tensor: Any) -> tuple[int, ...]:
    """A tensor's shape as the model sees it (a quantised one's bytes are stored in a different shape)."""
    return tuple(getattr(tensor, "quant_shape", tensor.shape))


def transformer(cls: Any, config: dict[str, Any], converted: dict[str, Any], dtype: torch.dtype | None) -> Any:
    """The diffusers transformer from diffusers-layout GGUF weights, through diffusers' GGUF loader."""
    import torch
    from diffusers import GGUFQuantizationConfig

    compute = dtype or torch.float32
    with tempfile.TemporaryDirectory() as folder:  # from_single_file reads a config folder: ours, not the Hub's
        (Path(folder) / "config.json").write_text(json.dumps({"_class_name": cls.__name__, **config}))
        return cls.from_single_file(
            converted, config=folder, local_files_only=True, torch_dtype=compute,
            quantization_config=GGUFQuantizationConfig(compute_dtype=compute),
        ).eval().requires_grad_(False)  # fmt: skip


def is_quantised(module: Any) -> bool:
    return getattr(module, "hf_quantizer", None) is not None


def family_of(path: Path) -> FlowFamily | None:
    from difftool.plugins.builtin.flow.families import detect_shapes

    try:
        return detect_shapes(read_shapes(path))
    except (ModelError, OSError, UnicodeDecodeError):
        return None
