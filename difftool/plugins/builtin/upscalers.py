"""Community upscaler models (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, SPAN, OmniSR, ...) through spandrel.

People arriving from chaiNNer, ComfyUI, A1111 or Upscayl keep folders of ``.pth``/``.safetensors``
upscalers; spandrel (MIT, what A1111 and ComfyUI use) detects the architecture and scale from the
weights. difftool reads the weights itself and hands spandrel a state dict, so nothing is ever
unpickled beyond tensors: safetensors through :func:`~difftool.core.safetensors_check.check_safetensors`,
pickles only with ``torch.load(weights_only=True)``; TorchScript is refused. Only spandrel's own
registry is used (its MIT architectures); ``spandrel-extra-arches`` (non-commercial) is never loaded.

spandrel imports ``torchvision`` for two architectures it ships (LaMa, RestoreFormer). Where
torchvision is missing, or is a CUDA build that fails beside a CPU torch, :func:`import_spandrel`
lends spandrel a stand-in for the three names it imports, only while spandrel imports, so nothing
else (transformers) ever sees it; those two architectures then say they need torchvision.
"""

from __future__ import annotations

import contextlib
import enum
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from difftool.core import phases
from difftool.core.atomic import file_sha256
from difftool.core.errors import DifftoolError, ModelError
from difftool.core.models import ModelResolver, model_path
from difftool.core.params import Params
from difftool.core.runtime import current

#: Files ``--model`` may name for superres as a community upscaler.
UPSCALER_SUFFIXES = (".pth", ".pt", ".safetensors")
#: Folders (under each model root) where chaiNNer, ComfyUI and A1111 users keep upscalers.
UPSCALER_FOLDERS = ("ESRGAN", "RealESRGAN", "upscale_models", "models/ESRGAN", "models/RealESRGAN")
#: ``ModelEntry.family`` of the upscalers ``difftool models`` lists.
FAMILY = "upscaler"
#: The families a model parameter that names a superres model takes (difftool's own and community ones).
SUPERRES_FAMILIES = ("difftool-superres", FAMILY)
#: spandrel architecture id -> the ONNX exporter tested for it (ESRGAN covers Real-ESRGAN x4plus, BSRGAN
#: and most community "4x-*" models; Compact is Real-ESRGAN's SRVGG). torch 2.13's torch.export-based
#: exporter crashes the process on SPAN's decomposition, so SPAN exports with the tracing exporter. An
#: untested architecture could crash the process too, so each is admitted with a test.
ONNX_ARCHITECTURES = {"ESRGAN": "dynamo", "Compact": "dynamo", "SPAN": "torchscript"}
#: Window-attention architectures export at one fixed tile (input pixels): an exported graph keeps the
#: shifted-window attention mask of the size it was exported at (4e-4 off at any other size), so every
#: tile is that size (the tiler takes full-size tiles; only an image smaller than the tile is padded).
FIXED_TILE_ARCHITECTURES = {"SwinIR": ("dynamo", 64), "DAT": ("dynamo", 64)}


def _needs_torchvision(*args: Any, **kwargs: Any) -> Any:
    raise ModelError("this architecture needs torchvision", "install the torchvision build that matches your torch")


@contextlib.contextmanager
def _torchvision_standin() -> Iterator[None]:
    try:
        import torchvision.transforms.functional  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or a mismatched build raising RuntimeError on import
        pass
    else:
        yield
        return
    saved = {k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")}
    for name in saved:
        del sys.modules[name]
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")  # type: ignore[attr-defined]
    functional.rotate = functional.normalize = _needs_torchvision  # type: ignore[attr-defined]
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional  # type: ignore[attr-defined]
    root = types.ModuleType("torchvision")
    root.transforms = transforms  # type: ignore[attr-defined]
    standins = {
        "torchvision": root,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    }
    sys.modules.update(standins)
    try:
        yield
    finally:
        for name in standins:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def import_spandrel() -> Any:
    """spandrel, imported once (with the torchvision stand-in where needed), or a :class:`ModelError`."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    with _torchvision_standin():
        try:
            import spandrel
        except ImportError as exc:
            raise ModelError(
                f"community upscaler models need spandrel ({exc})",
                "pip install spandrel (with the torchvision build that matches your torch, or with --no-deps)",
            ) from None
    return spandrel


@dataclass
class Upscaler:
    """A loaded community upscaler: spandrel's descriptor plus what the task records."""

    path: Path
    sha256: str
    descriptor: Any

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def architecture(self) -> str:
        return str(self.descriptor.architecture.name)

    @property
    def scale(self) -> int:
        return int(self.descriptor.scale)

    def dtype_for(self, requested: Any) -> Any:
        """``requested`` if the architecture supports it (spandrel says which), else fp32."""
        import torch

        supported = {
            torch.float32: True,
            torch.float16: self.descriptor.supports_half,
            torch.bfloat16: self.descriptor.supports_bfloat16,
        }
        return requested if supported.get(requested) else torch.float32


def upscaler_path(model: str | None, registry: ModelResolver | None = None) -> Path | None:
    """The upscaler file ``--model`` names (resolved by the preflight: a path, or a name ``difftool models``
    lists), else ``None`` (another kind of model, or none)."""
    if not model:
        return None
    path = model_path(model, registry)
    return path if path.is_file() and path.suffix.lower() in UPSCALER_SUFFIXES else None


def read_state_dict(path: Path) -> dict[str, Any]:
    """Tensors of an upscaler file; pickles only through ``weights_only=True`` (no code runs)."""
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        from difftool.core.safetensors_check import check_safetensors

        check_safetensors(path)
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - what the check above does not catch is still the file's fault
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"{path.name} is not a valid safetensors file ({detail[:200]})", "re-download or re-export it"
            ) from None
    try:
        # weights_only passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot flip an explicit True.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the restricted unpickler raises many types; we name the file
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{path.name} cannot be loaded safely (it holds more than tensors, or is TorchScript): {detail[:200]}",
            "convert it to .safetensors with a tool you trust",
        ) from None
    if not isinstance(state, dict):
        raise ModelError(f"{path.name} does not hold a state dict", "pass an upscaler's weights file")
    return state


def _loaded() -> dict[tuple[str, int], Upscaler]:
    """Loaded models, kept in the process's runtime (one at a time)."""
    return current().cache("upscalers", dict)


def load_upscaler(path: Path) -> Upscaler:
    """Load and check a community upscaler file (one stays cached for folder jobs)."""
    import torch

    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    cache = _loaded()
    if key in cache:
        return cache[key]
    phases.announce(f"loading model {path.name}")
    state = read_state_dict(path)
    spandrel = import_spandrel()
    state = spandrel.canonicalize_state_dict(state)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(tensors)
    except spandrel.UnsupportedModelError:
        sample = ", ".join(list(tensors)[:3]) or "no tensors"
        raise ModelError(
            f"{path.name}: no supported upscaler architecture matches its weights "
            f"({len(tensors)} tensors: {sample}, ...)",
            "use an ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, SPAN, OmniSR, ... model (spandrel's MIT architectures)",
        ) from None
    except DifftoolError:
        raise
    except Exception as exc:  # noqa: BLE001 - an architecture's loader rejecting odd weights
        raise ModelError(f"{path.name} cannot be loaded: {type(exc).__name__}: {exc}", "check the file") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise ModelError(f"{path.name} is a {descriptor.architecture.name} inpainting model", "pass an upscaler")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise ModelError(
            f"{path.name} works on {descriptor.input_channels}-channel images; difftool runs RGB upscalers",
            "pass an RGB model",
        )
    for name, tensor in descriptor.model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"{path.name}: weight {name} contains NaN or Inf", "re-download the model")
    descriptor.model.eval().requires_grad_(False)
    loaded = Upscaler(path, file_sha256(path), descriptor)
    cache.clear()
    cache[key] = loaded
    return loaded


def upscale(upscaler: Upscaler, rgb: np.ndarray, params: Params, context: Any) -> tuple[np.ndarray, str]:
    """Float RGB (H x W x 3, [0, 1]) upscaled by the model, tile by tile; and the precision used.

    These are plain feed-forward networks, so tiles are not blended: each tile carries ``--overlap``
    pixels (output scale) of context on every side and only its core is kept. Wherever the context
    covers the network's receptive field the result equals one pass over the whole image, with no
    seams. Memory is bounded by ``--tile``; cancel is checked and progress reported after every tile.
    """
    import copy

    import torch

    scale = upscaler.scale
    device = context.torch_device
    if context.backend_name in ("onnx", "tensorrt"):
        engine = None
        if context.backend_name == "tensorrt":
            wanted = upscaler.dtype_for(context.torch_dtype)
            engine = ("fp16" if wanted == torch.float16 else "fp32", max(8, params.tile // scale))
        model = onnx_runner(upscaler, context.device, engine)
        dtype = torch.float16 if engine and engine[0] == "fp16" else torch.float32
    else:
        dtype = upscaler.dtype_for(context.torch_dtype)
        model = upscaler.descriptor
        if dtype != torch.float32 or device.type != "cpu":  # never round or move the cached fp32 weights in place
            model = copy.deepcopy(model)
        model.to(device=device, dtype=dtype)
    height, width = rgb.shape[:2]
    tile = max(8, params.tile // scale)
    tile = getattr(model, "fixed_tile", None) or tile  # an export of one size takes tiles of that size
    margin = min(max(0, params.overlap // scale), tile // 4)  # context never dwarfs the core
    core = tile - 2 * margin

    def starts(length: int) -> range:  # a side that fits in one tile is one tile, not a tile and a sliver
        return range(0, length, core) if length > tile else range(0, 1)

    cores = [(y, x) for y in starts(height) for x in starts(width)]
    low = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    result = torch.zeros(3, height * scale, width * scale)
    for index, (y0, x0) in enumerate(cores):
        context.cancel.raise_if_cancelled()
        y1 = min(y0 + core, height) if height > tile else height
        x1 = min(x0 + core, width) if width > tile else width
        # Full-size tiles where the image allows (edge tiles reach inward): extra context changes nothing
        # for a CNN, and a fixed-size export or window attention sees the same tile size everywhere.
        ty0, tx0 = max(0, min(y0 - margin, height - tile)), max(0, min(x0 - margin, width - tile))
        ty1, tx1 = min(height, max(y1 + margin, ty0 + tile)), min(width, max(x1 + margin, tx0 + tile))
        with torch.inference_mode():
            out = model(low[..., ty0:ty1, tx0:tx1].to(device, dtype)).float().cpu()[0]
        result[:, y0 * scale : y1 * scale, x0 * scale : x1 * scale] = out[
            :, (y0 - ty0) * scale : (y1 - ty0) * scale, (x0 - tx0) * scale : (x1 - tx0) * scale
        ]
        context.report(index + 1, len(cores))
    return result.clamp(0, 1).permute(1, 2, 0).numpy(), str(dtype).replace("torch.", "")


class _PaddedOnnx:
    """An exported upscaler on ONNX Runtime, padding each tile to the sizes its graph takes (as spandrel's
    own call pads to the architecture's size requirements) and cropping the result."""

    def __init__(self, module: Any, sizes: Callable[[int, int], tuple[int, int]], scale: int) -> None:
        self.module, self.sizes, self.scale = module, sizes, scale
        self.fingerprint = module.fingerprint
        #: The one input size the export takes (window attention), or ``None`` (any size).
        self.fixed_tile: int | None = None

    def __call__(self, image: Any) -> Any:
        import torch.nn.functional as F

        height, width = image.shape[-2:]
        need = self.sizes(height, width)
        padded = F.pad(image, (0, need[1] - width, 0, need[0] - height), mode="replicate")
        (out,) = self.module(padded.contiguous())
        return out[..., : height * self.scale, : width * self.scale]


def _padded_size(height: int, width: int, requirements: Any) -> tuple[int, int]:
    multiple, minimum = max(1, int(requirements.multiple_of)), int(requirements.minimum)
    height, width = max(height, minimum), max(width, minimum)
    if requirements.square:
        height = width = max(height, width)
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def onnx_runner(upscaler: Upscaler, device: str, engine: tuple[str, int] | None = None) -> Any:
    """The upscaler exported to ONNX (validated against PyTorch, cached by the weights' hash) on ONNX Runtime,
    or, with ``engine=(precision, tile)``, as a TensorRT engine built from that export for tiles up to
    ``tile`` input pixels.

    Batch, height and width are dynamic; tiles are padded to the architecture's size requirements.
    """
    import torch

    from difftool.exporters.onnx_modules import ModuleSpec, cached_module_export
    from difftool.runtimes.onnxruntime.module import OnnxModule

    architecture = upscaler.descriptor.architecture.id
    tested = sorted([*ONNX_ARCHITECTURES, *FIXED_TILE_ARCHITECTURES])
    if architecture not in tested:
        raise ModelError(
            f"{upscaler.name} ({upscaler.architecture}) is not exported to ONNX by difftool yet "
            f"(tested: {', '.join(tested)})",
            "use --backend torch for this model",
        )
    requirements = upscaler.descriptor.size_requirements
    g = torch.Generator().manual_seed(0)
    fixed = FIXED_TILE_ARCHITECTURES.get(architecture)
    if fixed is not None:
        exporter, side = fixed[0], _padded_size(fixed[1], fixed[1], requirements)[0]

        def sizes(height: int, width: int) -> tuple[int, int]:
            return side, side

        spec = ModuleSpec(
            inputs={"image": torch.rand(1, 3, side, side, generator=g)},
            dynamic={},
            outputs=("out",),
            checks=({"image": torch.rand(1, 3, side, side, generator=g)},),
            exporter=exporter,
        )
    else:

        def sizes(height: int, width: int) -> tuple[int, int]:
            return _padded_size(height, width, requirements)

        def example(batch: int, height: int, width: int) -> torch.Tensor:
            return torch.rand(batch, 3, *sizes(height, width), generator=g)

        multiple = max(1, int(requirements.multiple_of))
        if multiple > 1:
            raise ModelError(
                f"{upscaler.name} ({upscaler.architecture}) needs sizes in multiples of {multiple}; its ONNX "
                "export is not built yet",
                "use --backend torch for this model",
            )
        spec = ModuleSpec(
            inputs={"image": example(2, 20, 28)},  # distinct sizes and batch 2: no 0/1 specialisation
            dynamic={"image": {0: ("batch", 1, 16), 2: ("h", 2, 4096), 3: ("w", 2, 4096)}},
            outputs=("out",),
            checks=({"image": example(1, 17, 23)}, {"image": example(1, 32, 12)}),
            exporter=ONNX_ARCHITECTURES[architecture],
        )
    name = f"upscaler-{upscaler.sha256[:12]}" + (f"-{side}px" if fixed is not None else "")
    try:
        entry = cached_module_export(lambda: upscaler.descriptor.model.float().eval(), name, spec, upscaler.sha256)
    except DifftoolError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporters reject some architectures in many ways
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{upscaler.name} ({upscaler.architecture}) cannot be exported to ONNX: {detail[:200]}",
            "use --backend torch for this model",
        ) from None
    if engine is None:
        module: Any = OnnxModule(entry, device)
    else:
        from difftool.runtimes.tensorrt.module import image_profile, module_engine

        precision, tile = engine
        low, high = (side, side) if fixed is not None else (sizes(1, 1)[0], max(sizes(tile, tile)))
        profile = image_profile(low, high)
        module = module_engine(entry, profile, device=device, precision=precision, scale=upscaler.scale)
    runner = _PaddedOnnx(module, sizes, upscaler.scale)
    runner.fixed_tile = side if fixed is not None else None
    return runner


def model_record(upscaler: Upscaler) -> dict[str, Any]:
    return {
        "model": upscaler.name,
        "model_hash": upscaler.sha256[:10],
        "architecture": upscaler.architecture,
        "model_scale": upscaler.scale,
    }
