"""Starting the app where no window can open: one line naming the cause and the fix, exit 1, no Qt abort."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from difftool.gui.display import debian_package, display_problem, xcb_plugin_missing_library

FOUND = lambda: None  # noqa: E731 - every library the X11 plugin needs is there
MISSING = lambda: "libxcb-icccm.so.4"  # noqa: E731


def test_no_display_at_all_is_named_with_the_fixes(tmp_path: Path) -> None:
    problem = display_problem({}, "linux", FOUND, tmp_path)
    assert problem is not None and "DISPLAY" in problem and "difftool run" in problem


def test_a_missing_xcb_library_is_named_with_the_package_to_install(tmp_path: Path) -> None:
    (tmp_path / "X0").touch()
    problem = display_problem({"DISPLAY": ":0"}, "linux", MISSING, tmp_path)
    assert problem is not None and "libxcb-icccm.so.4" in problem and "apt install libxcb-icccm4" in problem
    assert display_problem({"DISPLAY": ":0"}, "linux", FOUND, tmp_path) is None


def test_debian_package_names() -> None:
    assert debian_package("libxcb-cursor.so.0") == "libxcb-cursor0"
    assert debian_package("libxkbcommon-x11.so.0") == "libxkbcommon-x11-0"


def test_the_real_plugin_check_names_a_library_or_nothing() -> None:
    missing = xcb_plugin_missing_library()  # this machine's answer: a .so name, or None when the plugin loads
    assert missing is None or ".so" in missing


def test_a_display_nobody_listens_on_is_named(tmp_path: Path) -> None:
    problem = display_problem({"DISPLAY": ":7"}, "linux", FOUND, tmp_path)
    assert problem is not None and ":7" in problem


@pytest.mark.parametrize(
    "env",
    [{"QT_QPA_PLATFORM": "offscreen"}, {"WAYLAND_DISPLAY": "wayland-0"}],
)
def test_headless_platforms_and_wayland_need_no_x_server(env: dict[str, str], tmp_path: Path) -> None:
    assert display_problem(env, "linux", MISSING, tmp_path) is None
    assert display_problem({}, "win32", MISSING, tmp_path) is None


def test_difftool_gui_without_a_display_exits_1_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    done = subprocess.run(
        [sys.executable, "-m", "difftool", "gui"], env=env, capture_output=True, text=True, timeout=120
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: no display") and "DISPLAY" in lines[0], lines


def test_a_platform_list_falls_back_to_x11_as_qt_does(tmp_path: Path) -> None:
    (tmp_path / "X0").touch()
    env = {"QT_QPA_PLATFORM": "wayland;xcb", "DISPLAY": ":0"}  # a session default, here over ssh -X
    assert display_problem(env, "linux", FOUND, tmp_path) is None
    assert "libxcb-icccm4" in display_problem(env, "linux", MISSING, tmp_path)
    assert debian_package("libEGL.so.1") == "libegl1"
