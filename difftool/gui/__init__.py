"""The PySide6 desktop app (``difftool gui``, extra ``[gui]``).

It drives the same :func:`difftool.api.run` as the CLI; forms are generated from task declarations,
so a plugin's task appears with a working form and no GUI code of its own.
"""


def main(argv: list[str] | None = None) -> int:
    """Start the app; returns the Qt exit code."""
    from difftool.gui.app import run_app

    return run_app(argv or [])
