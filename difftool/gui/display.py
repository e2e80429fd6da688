"""Whether Qt can open a window here, checked before a ``QApplication`` exists.

Qt itself aborts (exit 134, "Reinstalling the application may fix this problem") when it finds no
display or its X11 plugin cannot load; this check names the cause and the fix in one line instead.
No Qt import here: it must run where Qt would abort.
"""

from __future__ import annotations

import ctypes.util
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

#: Qt platforms that need no display server (tests, screenshots, VNC, framebuffers).
HEADLESS_PLATFORMS = ("offscreen", "minimal", "vnc", "eglfs", "linuxfb", "vkkhrdisplay")
CLI_HINT = "or use the command line (difftool run ...)"


def display_problem(
    env: Mapping[str, str] | None = None,
    platform: str = sys.platform,
    find_library: Callable[[str], str | None] = ctypes.util.find_library,
    x11_sockets: Path = Path("/tmp/.X11-unix"),
) -> str | None:
    """``None`` if Qt can open a window, else one line naming the cause and the fix."""
    env = os.environ if env is None else env
    if not platform.startswith("linux"):
        return None  # Windows and macOS always have their own platform plugin
    requested = env.get("QT_QPA_PLATFORM", "").split(":")[0].split(";")[0]
    if requested in HEADLESS_PLATFORMS:
        return None
    x11, wayland = env.get("DISPLAY", ""), env.get("WAYLAND_DISPLAY", "")
    if requested.startswith("wayland") and not wayland:
        return f"QT_QPA_PLATFORM={requested} but WAYLAND_DISPLAY is not set; run it in a Wayland session {CLI_HINT}"
    if not x11 and not wayland:
        return (
            "no display to open a window on (neither DISPLAY nor WAYLAND_DISPLAY is set); "
            f"run it in a desktop session, set DISPLAY (e.g. ssh -X, or xvfb-run for a virtual one), {CLI_HINT}"
        )
    if wayland and requested != "xcb":
        return None  # Qt's Wayland plugin needs no xcb libraries
    local = re.fullmatch(r"(?:unix)?:(\d+)(?:\.\d+)?", x11)
    if local and x11_sockets.is_dir() and not (x11_sockets / f"X{local.group(1)}").exists():
        return f"cannot reach the X display {x11} (no X server is listening); set DISPLAY to a running one {CLI_HINT}"
    if find_library("xcb-cursor") is None:
        return (
            "Qt 6 needs libxcb-cursor0 to open a window on X11 and it is not installed; "
            f"install it (apt install libxcb-cursor0, dnf install xcb-util-cursor) {CLI_HINT}"
        )
    return None
