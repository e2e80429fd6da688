"""How the server words what it could not parse (shared by the app's handlers and the routes)."""

from __future__ import annotations

import json


def body_error(error: BaseException) -> str:
    """Why a request body could not be parsed, in one line (the 422's message)."""
    if isinstance(error, RecursionError):
        return "the request body nests JSON too deeply; send a flat request"
    if isinstance(error, UnicodeDecodeError):
        return "the request body is not UTF-8 text; send JSON encoded as UTF-8"
    if isinstance(error, json.JSONDecodeError):
        return f"the request body is not valid JSON: {error.msg} at character {error.pos}"
    return "the request body could not be read as JSON; send a JSON object"
