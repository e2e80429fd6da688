"""Whether Qt can open a window here, checked before a ``QApplication`` exists.

Qt itself aborts (exit 134, "Reinstalling the application may fix this problem") when it finds no
display or its X11 plugin cannot load; this check names the cause and the fix in one line instead.
No Qt import here: it must run where Qt would abort.
"""

from __future__ import annotations

import ctypes
import importlib.util
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
    missing_x11_library: Callable[[], str | None] | None = None,
    x11_sockets: Path = Path("/tmp/.X11-unix"),
) -> str | None:
    """``None`` if Qt can open a window, else one line naming the cause and the fix."""
    env = os.environ if env is None else env
    if not platform.startswith("linux"):
        return None  # Windows and macOS always have their own platform plugin
    # "wayland;xcb": Qt tries each in turn; "xcb:arg=value" carries plugin arguments.
    requested = [p.split(":")[0] for p in env.get("QT_QPA_PLATFORM", "").split(";") if p]
    if any(p in HEADLESS_PLATFORMS for p in requested):
        return None
    x11, wayland = env.get("DISPLAY", ""), env.get("WAYLAND_DISPLAY", "")
    if requested and all(p.startswith("wayland") for p in requested) and not wayland:
        return f"QT_QPA_PLATFORM={requested[0]} but WAYLAND_DISPLAY is not set; run it in a Wayland session {CLI_HINT}"
    if not x11 and not wayland:
        return (
            "no display to open a window on (neither DISPLAY nor WAYLAND_DISPLAY is set); "
            f"run it in a desktop session, set DISPLAY (e.g. ssh -X, or xvfb-run for a virtual one), {CLI_HINT}"
        )
    if wayland and requested != ["xcb"]:
        return None  # Qt's Wayland plugin needs no xcb libraries
    local = re.fullmatch(r"(?:unix)?:(\d+)(?:\.\d+)?", x11)
    if local and x11_sockets.is_dir() and not (x11_sockets / f"X{local.group(1)}").exists():
        return f"cannot reach the X display {x11} (no X server is listening); set DISPLAY to a running one {CLI_HINT}"
    missing = (missing_x11_library or xcb_plugin_missing_library)()
    if missing is not None:
        return (
            f"Qt's X11 plugin cannot load: {missing} is not installed; install it "
            f"(apt install {debian_package(missing)}; Qt 6 also needs libxcb-cursor0) {CLI_HINT}"
        )
    return None


def xcb_plugin_missing_library() -> str | None:
    """The shared library Qt's X11 plugin cannot find (``libxcb-icccm.so.4``), or ``None`` if it loads.

    Loading the plugin's file is the one exact test: Qt itself only says that "xcb-cursor0 or
    libxcb-cursor0 is needed" whichever of its dozen xcb libraries is missing.
    """
    spec = importlib.util.find_spec("PySide6")
    if spec is None or not spec.submodule_search_locations:
        return None
    plugin = Path(list(spec.submodule_search_locations)[0]) / "Qt" / "plugins" / "platforms" / "libqxcb.so"
    if not plugin.is_file():
        return None  # a PySide6 built differently: let Qt decide
    try:
        ctypes.CDLL(str(plugin))
    except OSError as error:
        found = re.match(r"([\w.+-]+\.so[\w.]*): cannot open shared object file", str(error))
        return found.group(1) if found else str(error).split(":")[0]
    return None


def debian_package(library: str) -> str:
    """Debian's package for a shared library: ``libxcb-icccm.so.4`` -> ``libxcb-icccm4``."""
    found = re.fullmatch(r"(lib[\w+-]+)\.so\.(\d+).*", library)
    if not found:
        return library
    name, major = found.groups()
    name = name.lower()  # libEGL.so.1 -> libegl1
    return f"{name}-{major}" if name[-1].isdigit() else f"{name}{major}"
