"""Reading and writing images: one loader for every task, PNG metadata, atomic saves.

Policy, in one place:

* **Formats** are detected from the file's content and limited to :data:`ALLOWED_FORMATS`, whatever
  the file is called (a ``.png`` that is really EPS is refused).
* **Size** is checked from the header, before any pixel is decoded, against :func:`max_pixels`
  (``DIFFTOOL_MAX_PIXELS``, default Pillow's own 89.5 MP). Pillow's global limit is never changed.
* **Orientation**: the EXIF orientation tag is applied; corrupt EXIF is ignored with the image kept.
* **Modes** are normalised to float RGB in [0, 1]: 16-bit data (``I;16*``, and ``I`` within 0..65535)
  is divided by 65535, never clipped to 8 bits; ``I`` and ``F`` data outside that range is scaled by
  its own min..max. ``1``/``L``/``LA``/``I*``/``F`` are marked grayscale so a task can keep the mode.
* **Alpha** (``LA``, ``RGBA``, ``PA`` and ``P`` with a ``transparency`` entry) is split off and kept in
  :attr:`LoadedImage.alpha`; tasks that can re-attach it do (superres upscales it separately).
* **Frames**: animated GIF/WebP/PNG and multi-page TIFF use their first frame.
* **Output** is written atomically with its parameters (:mod:`difftool.core.metadata`): PNG in text
  chunks, JPEG and WebP in EXIF, as A1111 does.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from difftool.core import metadata
from difftool.core.atomic import atomic_write
from difftool.core.errors import ImageError, ImageTooLargeError
from difftool.core.jpeg import jpeg_quality

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS, held here so theirs stays untouched
SAVE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_GRAY = {"1", "L", "LA", "La", "I", "F"} | _SIXTEEN_BIT


def max_pixels() -> int:
    """Largest image (width x height) difftool decodes or writes; ``DIFFTOOL_MAX_PIXELS`` overrides."""
    raw = os.environ.get("DIFFTOOL_MAX_PIXELS")
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        return int(raw)
    except ValueError:
        raise ImageError(
            f"DIFFTOOL_MAX_PIXELS={raw!r} is not an integer", "set it to a pixel count such as 200000000"
        ) from None


#: The fix :func:`check_pixels` names when the limit is the process's own (``DIFFTOOL_MAX_PIXELS``).
_RAISE_LIMIT = "set DIFFTOOL_MAX_PIXELS to a larger value if you trust this image"


def check_pixels(width: int, height: int, what: str = "image", limit: int | None = None, fix: str = "") -> None:
    """Raise :class:`ImageTooLargeError` if a ``width`` x ``height`` ``what`` is over ``limit`` (default:
    :func:`max_pixels`; a server passes its per-request budget and the ``fix`` its client can apply)."""
    own = max_pixels()
    if limit is None or limit >= own:  # the process's own limit binds: raising it is the fix
        limit, fix = own, ""
    if width * height > limit:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,}",
            fix or _RAISE_LIMIT,
        )


@dataclass
class LoadedImage:
    """An image normalised for a task: float32 RGB in [0, 1] plus what was learned about the source."""

    rgb: np.ndarray  # H x W x 3, float32, [0, 1]
    alpha: np.ndarray | None = None  # H x W, float32, [0, 1]
    grayscale: bool = False
    bits: int = 8
    source_mode: str = "RGB"
    source_format: str | None = None
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def to_pil(self, keep_mode: bool = False) -> Image.Image:
        """Back to an 8-bit PIL image; ``keep_mode`` writes grayscale sources as ``L``/``LA``."""
        return to_pil(self.rgb, self.alpha, grayscale=keep_mode and self.grayscale)


def _describe(source: object) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "image data"


#: What Pillow raises for damaged or hostile files besides OSError: ValueError for PNG text chunks that
#: decompress past its MAX_TEXT_CHUNK / MAX_TEXT_MEMORY limits, SyntaxError and struct.error for
#: broken chunk structure, EOFError for truncation in some plugins.
_CORRUPT = (OSError, ValueError, SyntaxError, struct.error, EOFError)
#: Largest input file read into memory (bytes); ``DIFFTOOL_MAX_INPUT_BYTES`` overrides.
DEFAULT_MAX_INPUT_BYTES = 1 << 30


def _unreadable(name: str, exc: BaseException, truncated: bool = False) -> ImageError:
    if isinstance(exc, ValueError) and any(k in str(exc) for k in ("Too Large", "too large", "Too much memory")):
        # Pillow's text-chunk limits (MAX_TEXT_CHUNK, MAX_TEXT_MEMORY): a metadata bomb, not a broken picture
        return ImageError(f"{name} cannot be read: oversized metadata ({_first_line(exc)})", "re-save it without it")
    if truncated:
        return ImageError(f"{name} is truncated or corrupt ({_first_line(exc)})", "re-export the image")
    return ImageError(f"{name} cannot be read: {_first_line(exc)}", "check the file")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_regular_file(path: Path) -> None:
    """Refuse FIFOs, devices and sockets (a read would block or never end) and oversized files."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ImageError(f"{path} cannot be read: {exc.strerror}", "check the path and its permissions") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{path} is not a regular file (a pipe, device or socket)", "pass an image file")
    raw = os.environ.get("DIFFTOOL_MAX_INPUT_BYTES")
    try:
        limit = int(raw) if raw else DEFAULT_MAX_INPUT_BYTES
    except ValueError:
        raise ImageError(
            f"DIFFTOOL_MAX_INPUT_BYTES={raw!r} is not an integer", "set it to a byte count such as 2000000000"
        ) from None
    if info.st_size > limit:
        raise ImageTooLargeError(
            f"{path} is {info.st_size:,} bytes, over the input limit of {limit:,}",
            "set DIFFTOOL_MAX_INPUT_BYTES to a larger value if you trust this file",
        )


def open_image(
    source: str | os.PathLike[str] | bytes | Image.Image, limit: int | None = None, fix: str = ""
) -> LoadedImage:
    """Load ``source`` (a path, encoded bytes or a PIL image) as a :class:`LoadedImage`.

    ``limit``/``fix``: a pixel budget below :func:`max_pixels` (a server's per request), checked from the
    header before decoding, and the fix its error names.
    """
    path: Path | None = None
    if isinstance(source, Image.Image):
        check_pixels(*source.size, limit=limit, fix=fix)
        return _normalise(source, path=None)
    if isinstance(source, (bytes, bytearray)):
        stream: Any = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{path}: no such file", "check the path")
        if path.is_dir():
            raise ImageError(f"{path} is a folder, not an image", "pass an image file")
        check_regular_file(path)
        stream = path
    name = _describe(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(stream, formats=ALLOWED_FORMATS)
            except Image.DecompressionBombError:  # over twice Pillow's own limit: difftool's decides, below
                image = _open_past_pillows_limit(stream, name)
    except UnidentifiedImageError:
        raise ImageError(
            f"{name} is not an image difftool reads",
            f"use one of {', '.join(f.lower() for f in ALLOWED_FORMATS)}",
        ) from None
    except _CORRUPT as exc:
        raise _unreadable(name, exc) from None
    with image:
        check_pixels(*image.size, what=name, limit=limit, fix=fix)
        try:
            image.load()
        except _CORRUPT as exc:
            raise _unreadable(name, exc, truncated=True) from None
        except Image.DecompressionBombError as exc:  # a TIFF page checked again as it loads
            raise _pillows_own_limit(name, image.format, exc) from None
        fmt = image.format
        quality = jpeg_quality(getattr(image, "quantization", None)) if fmt == "JPEG" else None
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001 - corrupt EXIF must not lose the picture; orientation is kept as stored
            pass
        loaded = _normalise(image, path=path)
    loaded.source_format = fmt
    if quality is not None:
        loaded.info["jpeg_quality"] = quality
    return loaded



def _open_past_pillows_limit(stream: Path | io.BytesIO, name: str) -> Image.Image:
    """``Image.open`` less Pillow's own bomb check, which refuses over twice its ``MAX_IMAGE_PIXELS`` (a
    global difftool never changes) whatever ``DIFFTOOL_MAX_PIXELS`` allows: the same plugins, tried as
    Pillow tries them; :func:`check_pixels` then applies difftool's limit, from the header, as for any image.
    The WebP and TIFF plugins check Pillow's limit again themselves: such an image is refused, saying so."""
    Image.init()
    handle = stream.open("rb") if isinstance(stream, Path) else stream
    handle.seek(0)
    prefix = handle.read(16)
    for fmt in ALLOWED_FORMATS:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and (isinstance(accept(prefix), str) or not accept(prefix)):
            continue
        handle.seek(0)
        try:
            image = factory(handle, str(stream) if isinstance(stream, Path) else "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
        except Image.DecompressionBombError as exc:
            if isinstance(stream, Path):
                handle.close()
            raise _pillows_own_limit(name, fmt, exc) from None
        image._exclusive_fp = isinstance(stream, Path)  # closing the image closes the file this opened
        return image
    if isinstance(stream, Path):
        handle.close()
    raise UnidentifiedImageError(f"cannot identify image file {stream}")


def _pillows_own_limit(name: str, fmt: str | None, exc: Exception) -> ImageTooLargeError:
    limit = 2 * int(Image.MAX_IMAGE_PIXELS or 0)
    return ImageTooLargeError(
        f"{name}: Pillow refuses {fmt or 'such'} images over {limit:,} pixels itself ({_first_line(exc)}); "
        "DIFFTOOL_MAX_PIXELS cannot raise that",
        "convert it to PNG, JPEG or BMP, which difftool reads up to DIFFTOOL_MAX_PIXELS",
    )


def _scaled_gray(array: np.ndarray, sixteen_bit: bool) -> tuple[np.ndarray, int]:
    data = array.astype(np.float64)
    if sixteen_bit or (array.dtype.kind in "iu" and data.min() >= 0 and data.max() <= 65535):
        return (data / 65535.0).astype(np.float32), 16
    if array.dtype.kind == "f" and data.min() >= 0 and data.max() <= 1:
        return data.astype(np.float32), 32
    finite = data[np.isfinite(data)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scale = hi - lo if hi > lo else 1.0
    return np.nan_to_num((data - lo) / scale).clip(0, 1).astype(np.float32), 32


def _normalise(image: Image.Image, path: Path | None) -> LoadedImage:
    mode = image.mode
    alpha: np.ndarray | None = None
    bits = 8
    if image.width < 1 or image.height < 1:  # a PIL image made in code; no file decodes to this
        raise ImageError(
            f"the image is {image.width}x{image.height}: it has no pixels", "pass an image of at least 1x1"
        )
    if mode == "La":  # premultiplied alpha: Pillow converts it only to LA (which un-premultiplies it)
        image = image.convert("LA")
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        gray, bits = _scaled_gray(np.asarray(image), sixteen_bit=mode in _SIXTEEN_BIT)
        rgb = np.repeat(gray[..., None], 3, axis=2)
    else:
        if mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif mode == "1":
            image = image.convert("L")
        elif image.mode not in ("L", "LA", "RGB", "RGBA"):
            try:
                image = image.convert("RGBA" if "A" in mode.upper() else "RGB")
            except ValueError as exc:  # a mode Pillow cannot convert to RGB (LAB)
                raise ImageError(
                    f"image mode {mode} cannot be read: {_first_line(exc)}", "convert the image to RGB or RGBA first"
                ) from None
        array = np.asarray(image, dtype=np.float32) / 255.0
        if image.mode in ("L", "LA"):
            gray = array if image.mode == "L" else array[..., 0]
            rgb = np.repeat(gray[..., None], 3, axis=2)
            alpha = array[..., 1] if image.mode == "LA" else None
        else:
            rgb = np.ascontiguousarray(array[..., :3])
            alpha = array[..., 3] if image.mode == "RGBA" else None
    if alpha is not None and bool((alpha >= 1.0).all()):
        alpha = None  # an opaque alpha channel carries nothing to keep
    return LoadedImage(
        rgb=np.ascontiguousarray(rgb, dtype=np.float32),
        alpha=None if alpha is None else np.ascontiguousarray(alpha, dtype=np.float32),
        grayscale=mode in _GRAY,
        bits=bits,
        source_mode=mode,
        path=path,
        info={k: v for k, v in image.info.items() if k in ("dpi", "icc_profile")},
    )


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Float [0, 1] to uint8 with rounding (NaN is an error, never a black pixel)."""
    if not np.isfinite(array).all():
        raise ImageError("the result contains NaN or Inf values", "try --dtype fp32 or another seed")
    return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_pil(rgb: np.ndarray, alpha: np.ndarray | None = None, grayscale: bool = False) -> Image.Image:
    """Float RGB (H x W x 3) and optional alpha (H x W) in [0, 1] to an 8-bit PIL image."""
    if grayscale:
        gray = to_uint8(rgb.mean(axis=2))
        if alpha is None:
            return Image.fromarray(gray, "L")
        return Image.fromarray(np.dstack([gray, to_uint8(alpha)]), "LA")
    if alpha is None:
        return Image.fromarray(to_uint8(rgb), "RGB")
    return Image.fromarray(np.dstack([to_uint8(rgb), to_uint8(alpha)]), "RGBA")


def read_metadata(source: str | os.PathLike[str] | Image.Image) -> dict[str, Any]:
    """Generation parameters stored in an image: ``{"difftool": {...}, "parameters": {...}}`` (either may be absent).

    PNG text chunks, and the EXIF ``UserComment`` of JPEG and WebP (where A1111 writes them).
    """
    if isinstance(source, Image.Image):
        return metadata.decode(source)
    try:
        check_regular_file(Path(source))
        with Image.open(source, formats=ALLOWED_FORMATS) as image:
            return metadata.decode(image)
    except (*_CORRUPT, UnidentifiedImageError) as exc:
        raise _unreadable(str(source), exc) from None


#: Formats that hold only 8 bits per channel: 16-bit grayscale is rescaled, not clipped, for them.
EIGHT_BIT_FORMATS = frozenset({"JPEG", "WEBP", "BMP"})


def to_eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer / float) grayscale image as 8-bit ``L``: 0..65535 maps to 0..255.

    Pillow's own ``convert("L")``/``convert("RGB")`` clips such values at 255, turning a 16-bit
    picture almost entirely white.
    """
    data = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        data = data * 65535.0  # difftool's float grayscale is in [0, 1]
    return Image.fromarray((np.clip(data, 0, 65535) / 257.0 + 0.5).astype(np.uint8), "L")


def save_image(image: Image.Image, path: str | os.PathLike[str], record: Mapping[str, Any] | None = None) -> Path:
    """Write ``image`` to ``path`` atomically, with ``record`` where the format holds it (PNG text, JPEG/WebP EXIF)."""
    target = Path(path)
    fmt = SAVE_FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise ImageError(
            f"cannot write {target.name}: unknown extension {target.suffix!r}",
            f"use one of {', '.join(sorted(SAVE_FORMATS))}",
        )
    check_pixels(*image.size, what=f"output {target.name}")
    kwargs: dict[str, Any] = {}
    if fmt in EIGHT_BIT_FORMATS and image.mode in _SIXTEEN_BIT | {"I", "F"}:
        image = to_eight_bit(image)
    if record is not None:
        kwargs |= metadata.encode(fmt, record)
    if fmt == "JPEG":
        if image.mode in ("RGBA", "LA"):
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
            image = background
        elif image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        kwargs["quality"] = 95
    if fmt == "WEBP":
        kwargs["quality"] = 95
    if fmt == "BMP" and image.mode == "LA":
        image = image.convert("RGBA")
    with atomic_write(target, "wb") as handle:
        image.save(handle, format=fmt, **kwargs)
    return target
