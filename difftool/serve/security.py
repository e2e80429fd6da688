"""Who may call the server, and which files and models a request may name.

A request never names a server-side path unless the operator passed ``--allow-path DIR``, and then
only inside one of those folders (after resolving ``..`` and symlinks). Models resolve among the
names the registry's model sources list (``GET /v1/models``), or inside an allowed folder.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from difftool.core.errors import DifftoolError, ImageError, ParameterError
from difftool.core.images import LoadedImage, check_pixels, open_image
from difftool.core.task import Task


class AccessDenied(DifftoolError):
    """A request named a file or model the server does not let it use (HTTP 403)."""


def token_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token``: ``Bearer TOKEN``, or HTTP Basic with it as the
    password (what A1111 clients such as ``webuiapi.set_auth`` send)."""
    if not authorization:
        return False
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), token.encode())
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):  # binascii.Error, and non-ASCII text (latin-1 header bytes)
            return False
        return hmac.compare_digest(decoded.partition(":")[2].encode(), token.encode())
    return False


class PathPolicy:
    """The folders requests may read from (``--allow-path``); none by default."""

    def __init__(self, roots: Sequence[Path] = ()) -> None:
        self.roots = tuple(Path(r).resolve(strict=True) for r in roots)

    def resolve(self, value: str | Path, what: str = "path") -> Path:
        """The real path ``value`` names if it lies inside an allowed folder, else :class:`AccessDenied`.

        A relative path is taken relative to the first allowed folder. Symlinks are resolved before the
        check, so a link inside the folder that points outside it is refused too.
        """
        if not self.roots:
            raise AccessDenied(
                f"{what} {str(value)!r}: this server accepts no server-side paths",
                "send the file's contents instead (or start the server with --allow-path DIR)",
            )
        if "\x00" in str(value):  # os.stat raises ValueError on it: no file is named so
            raise ParameterError(f"{what} contains a NUL character", "send the file's real name")
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.roots[0] / path
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise AccessDenied(
                f"{what} {str(value)!r} does not exist inside an allowed folder", "check the path"
            ) from None
        if not any(real == root or real.is_relative_to(root) for root in self.roots):
            raise AccessDenied(
                f"{what} {str(value)!r} is outside the folders this server allows",
                "use a path inside an --allow-path folder",
            )
        mode = real.stat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a FIFO's open() would block a worker forever
            raise ParameterError(
                f"{what} {str(value)!r} is not a regular file (a pipe, device or socket)", "name a file or folder"
            )
        return real


def resolve_model(name: str | None, registry: Any, policy: PathPolicy, families: Sequence[str] = ()) -> str | None:
    """The path of model ``name`` (a name ``GET /v1/models`` lists, or a path inside an allowed folder).

    ``families`` restricts which listed models count (an upscaler name for superres, a LoRA for --lora).
    """
    if name is None or name == "":
        return None
    if not isinstance(name, str) or "\x00" in name:
        raise ParameterError(f"model {str(name)[:80]!r} is not a model name", "GET /v1/models lists the names")
    for entry in registry.find_models():
        if entry.name == name and (not families or entry.family in families):
            return str(entry.path)
    if policy.roots and ("/" in name or (policy.roots[0] / name).exists()):  # a path, not a mistyped name
        return str(policy.resolve(name, "model"))
    raise ParameterError(
        f"model {name!r} is not one of this server's models", "GET /v1/models lists the names it accepts"
    )


def decode_base64(text: str, what: str, limit: int) -> bytes:
    """The bytes of a base64 string (a ``data:...;base64,`` prefix is allowed), refused above ``limit``."""
    if "," in text[:100] and text.startswith("data:"):
        text = text.split(",", 1)[1]
    if len(text) * 3 // 4 > limit:
        raise ParameterError(f"{what} is larger than {limit} bytes", "send a smaller image")
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise ParameterError(f"{what} is not valid base64", "send the file's bytes base64-encoded") from None


#: The fix a client can apply when an image is over the server's pixel budget.
PIXELS_FIX = "send a smaller image (the server's --max-pixels sets the budget)"


def load_image(value: Any, what: str, policy: PathPolicy, limit: int, max_pixels: int | None = None) -> LoadedImage:
    """An image given as base64 text, raw bytes, or ``{"path": ...}`` inside an allowed folder.

    The pixel budget (``max_pixels``, the server's ``--max-pixels``; never above ``DIFFTOOL_MAX_PIXELS``)
    is checked from the header, before decoding.
    """
    if isinstance(value, LoadedImage):
        check_pixels(*value.size, what=what, limit=max_pixels, fix=PIXELS_FIX)
        return value
    if isinstance(value, Mapping) and set(value) == {"path"}:
        return open_image(policy.resolve(str(value["path"]), what), max_pixels, PIXELS_FIX)
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        data = decode_base64(value, what, limit)
    else:
        raise ParameterError(f"{what}: expected base64 image data", 'send base64 PNG/JPEG bytes or {"path": ...}')
    if not data:
        raise ImageError(f"{what} is empty", "send the image's bytes")
    return open_image(data, max_pixels, PIXELS_FIX)


#: Built-in string parameters that name a superres model unless they hold one of :data:`KEYWORDS`.
UPSCALER_PARAMS = ("hires_upscaler", "upscaler")
KEYWORDS = ("latent", "embedded", "lanczos")
UPSCALER_FAMILIES = ("difftool-superres", "upscaler")
#: The family ``difftool models`` gives SDXL refiners (generate's ``refiner``).
REFINER_FAMILIES = ("sdxl-refiner",)


def check_params(
    task: Task,
    params: Mapping[str, Any],
    registry: Any,
    policy: PathPolicy,
    limit: int = 50 << 20,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """``params`` with every server-side file reference checked (path params, ``lora``, ControlNet units);
    pickles refused. ``limit``: the largest image (bytes) a ControlNet unit may send inline."""
    checked = dict(params)
    for param in task.params:
        value = checked.get(param.name)
        if value is None:
            continue
        if param.type == "path" and param.multiple:  # each value (--reference: images or folders)
            items = value if isinstance(value, (list, tuple)) else str(value).splitlines()
            checked[param.name] = [str(policy.resolve(str(item), param.name)) for item in items if item]
        elif param.type == "path":
            checked[param.name] = str(policy.resolve(str(value), param.name))
        elif param.name == "lora" and param.type == "string":
            checked[param.name] = _checked_loras(str(value), registry, policy)
        elif param.name == "embedding" and param.type == "string":  # files; named ones are found by the task
            checked[param.name] = ",".join(
                str(policy.resolve(item.strip(), "embedding")) for item in str(value).split(",") if item.strip()
            )
        elif param.name == "control" and param.multiple:
            items = value if isinstance(value, (list, tuple)) else str(value).splitlines()
            checked[param.name] = [
                _checked_control(item, registry, policy, limit, max_pixels) for item in items if item
            ]
        elif param.name == "refiner" and param.type == "string":
            checked[param.name] = resolve_model(str(value), registry, policy, families=REFINER_FAMILIES)
        elif param.name in UPSCALER_PARAMS and param.type == "string" and str(value).lower() not in KEYWORDS:
            checked[param.name] = resolve_model(str(value), registry, policy, families=UPSCALER_FAMILIES)
        elif param.name == "allow_pickle" and value not in (False, 0, "false", "0", "no", "off", ""):
            raise AccessDenied(
                "allow_pickle: the server never unpickles files named in a request", "use .safetensors models"
            )
    return checked


#: The families ``difftool models`` gives ControlNets.
CONTROLNET_FAMILIES = ("sd1-controlnet", "sd2-controlnet", "sdxl-controlnet")


def _checked_control(item: Any, registry: Any, policy: PathPolicy, limit: int, max_pixels: int | None) -> Any:
    """A ControlNet unit whose model is a listed ControlNet (or inside an allowed folder) and whose image is a
    path inside an allowed folder (string form ``MODEL=PATH,...``) or, in the mapping form, base64 data or
    ``{"path": ...}``."""
    if isinstance(item, Mapping):
        unit = dict(item)
        unit["model"] = resolve_model(str(unit.get("model") or ""), registry, policy, CONTROLNET_FAMILIES)
        if unit.get("image") is not None:
            unit["image"] = load_image(unit["image"], "control image", policy, limit, max_pixels).rgb
        return unit
    head, comma, rest = str(item).partition(",")
    name, _, image = head.partition("=")
    model = resolve_model(name.strip(), registry, policy, CONTROLNET_FAMILIES)
    image = f"={policy.resolve(image.strip(), 'control image')}" if image.strip() else ""
    return f"{model}{image}{comma}{rest}"


def _checked_loras(spec: str, registry: Any, policy: PathPolicy) -> str:
    """``NAME[:WEIGHT],...`` with each name resolved among the listed LoRAs or inside an allowed folder."""
    items = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, weight = item.rpartition(":")
        if not sep or not _is_number(weight):
            name, weight = item, ""
        path = resolve_model(name, registry, policy, families=("lora",))
        items.append(f"{path}:{weight}" if weight else str(path))
    return ",".join(items)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
