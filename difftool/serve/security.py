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

from difftool.core.errors import DifftoolError, ImageError, ModelError, ParameterError
from difftool.core.images import LoadedImage, check_pixels, open_image
from difftool.core.models import ModelRef
from difftool.core.task import RegistryView, Task


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


def resolve_model(
    name: str | None, registry: RegistryView, policy: PathPolicy, families: Sequence[str] = ()
) -> str | None:
    """Model ``name`` resolved for a request: a name ``GET /v1/models`` lists (among ``families``), or a path
    inside an allowed folder; a :class:`~difftool.core.models.ModelRef`, so records show the name as sent."""
    if name is None or name == "":
        return None
    if isinstance(name, ModelRef):  # resolved already, by this policy
        return name
    if not isinstance(name, str) or "\x00" in name:
        raise ParameterError(f"model {str(name)[:80]!r} is not a model name", "GET /v1/models lists the names")
    try:
        return ModelRef(name, registry.resolve_model(name, families, paths=False))
    except ModelError:
        if policy.roots and ("/" in name or (policy.roots[0] / name).exists()):  # a path, not a mistyped name
            return ModelRef(name, policy.resolve(name, "model"))
    raise ParameterError(
        f"model {name!r} is not one of this server's models", "GET /v1/models lists the names it accepts"
    )


class PolicyResolver:
    """The :class:`~difftool.core.params.Resolver` a server's preflight uses: every model a request names (a
    model parameter, a structured value's model, the task's model) and every file it names go through the
    path policy, whatever the parameter is called."""

    def __init__(self, registry: RegistryView, policy: PathPolicy) -> None:
        self.registry, self.policy = registry, policy

    def model(self, name: str, families: Sequence[str], what: str) -> str:
        return resolve_model(name, self.registry, self.policy, families) or ""

    def file(self, path: str | Path, what: str) -> Path:
        return self.policy.resolve(path, what)


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


def check_params(
    task: Task,
    params: Mapping[str, Any],
    registry: RegistryView,
    policy: PathPolicy,
    limit: int = 50 << 20,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """``params`` with the server-side files they name checked, by parameter kind: a path parameter inside an
    allowed folder; a structured value sent as a JSON object (a ControlNet unit) with its ``image`` decoded
    (base64, or ``{"path": ...}`` inside an allowed folder); pickles refused. Models, and the names inside
    structured values, are resolved by the preflight through :class:`PolicyResolver`. ``limit``: the largest
    image (bytes) a structured value may send inline."""
    checked = dict(params)
    for param in task.params:
        value = checked.get(param.name)
        if value is None:
            continue
        if param.type == "path" and param.multiple:  # each value (--reference: images or folders)
            items = value if isinstance(value, (list, tuple)) else str(value).splitlines()
            checked[param.name] = [
                _path_or_image(item, param.name, policy, limit, max_pixels) for item in items if item
            ]
        elif param.type == "path" and isinstance(value, ModelRef):
            pass  # a name the server itself resolved among its model folders (an A1111 unit's IP-Adapter)
        elif param.type == "path":
            checked[param.name] = str(policy.resolve(str(value), param.name))
        elif param.parse is not None and param.multiple:
            items = value if isinstance(value, (list, tuple)) else str(value).splitlines()
            checked[param.name] = [_decoded(item, policy, limit, max_pixels) for item in items if item]
        elif param.name == "allow_pickle" and value not in (False, 0, "false", "0", "no", "off", ""):
            raise AccessDenied(
                "allow_pickle: the server never unpickles files named in a request", "use .safetensors models"
            )
    return checked


def _path_or_image(item: Any, name: str, policy: PathPolicy, limit: int, max_pixels: int | None) -> Any:
    """One value of a multiple path parameter: a path inside an allowed folder, or an image sent inline as
    ``{"image": base64}`` (an A1111 IP-Adapter unit's reference), decoded here within the server's budgets."""
    if isinstance(item, Mapping) and set(item) == {"image"}:
        return load_image(item["image"], f"{name} image", policy, limit, max_pixels)
    return str(policy.resolve(str(item), name))


def _decoded(item: Any, policy: PathPolicy, limit: int, max_pixels: int | None) -> Any:
    """A structured value as sent: a JSON object's ``image`` is wire data (base64 or ``{"path": ...}``), decoded
    here, where the server's image budget applies; text goes to the parameter's own parser unchanged."""
    if isinstance(item, Mapping) and item.get("image") is not None:
        return {**item, "image": load_image(item["image"], "control image", policy, limit, max_pixels).rgb}
    return item
