"""Reading weight files safely: safetensors headers and tensors; pickles only on explicit opt-in."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from difftool.core.errors import ModelError
from difftool.core.safetensors_check import check_safetensors

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def is_pickle(path: Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(path: Path) -> ModelError:
    return ModelError(
        f"{path.name} is a pickle file, which can run arbitrary code when loaded; difftool refuses it by default",
        "convert it to .safetensors, or pass --allow-pickle if you trust its source",
    )


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (checked), without reading the weights."""
    path = Path(path)
    if is_pickle(path):
        raise refuse_pickle(path)
    return check_safetensors(path)


def load_pickle(path: Path, *, allow_pickle: bool = False) -> object:
    """A pickle file's contents, only with ``allow_pickle``, and only what ``weights_only`` lets through."""
    path = Path(path)
    if not allow_pickle:
        raise refuse_pickle(path)
    import torch

    try:
        # weights_only passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot flip an explicit True.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types; we name the file
        raise ModelError(
            f"{path.name} cannot be loaded safely: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            "convert it to .safetensors with a tool you trust",
        ) from exc


def load_state_dict(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a weights file, on the CPU. Pickles need ``allow_pickle`` and load with weights_only."""
    path = Path(path)
    if is_pickle(path):
        state = load_pickle(path, allow_pickle=allow_pickle)
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelError(f"{path.name} does not hold a state dict", "pass a checkpoint of tensors")
        return {k: v for k, v in state.items() if hasattr(v, "shape")}
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise _invalid(path, exc) from exc


def _invalid(path: Path, exc: Exception) -> ModelError:
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ModelError(f"{path.name} is not a valid safetensors file ({detail})", "re-download or re-export it")
