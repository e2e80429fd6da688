"""How the server words what it could not parse (shared by the app's handlers and the routes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

#: An absolute path inside a string (``/models/Lora/ink.safetensors`` in ``"/models/Lora/ink.safetensors:0.5"``).
ABSOLUTE_PATH = re.compile(r"(?<![\w.])/[^\s:,;\"']+")


def without_paths(text: str) -> str:
    """``text`` with every absolute path cut to its last part: what the server tells a client never shows the
    server's folder layout (model roots, --allow-path folders, the result folder)."""
    return ABSOLUTE_PATH.sub(lambda m: Path(m.group(0)).name or "/", text)


def body_error(error: BaseException) -> str:
    """Why a request body could not be parsed, in one line (the 422's message)."""
    if isinstance(error, RecursionError):
        return "the request body nests JSON too deeply; send a flat request"
    if isinstance(error, UnicodeDecodeError):
        return "the request body is not UTF-8 text; send JSON encoded as UTF-8"
    if isinstance(error, json.JSONDecodeError):
        return f"the request body is not valid JSON: {error.msg} at character {error.pos}"
    return "the request body could not be read as JSON; send a JSON object"
