"""The PySide6 desktop app (``difftool gui``, extra ``[gui]``).

It drives the same :func:`difftool.app.api.run` as the CLI; forms are generated from task declarations,
so a plugin's task appears with a working form and no GUI code of its own.
"""


def main(argv: list[str] | None = None) -> int:
    """Start the app; returns the Qt exit code, or 1 with a one-line error when no window can be opened."""
    import sys

    from difftool.gui.display import display_problem

    try:
        import PySide6  # noqa: F401
    except ImportError as error:
        print(f"Error: the desktop app needs PySide6 ({error}); pip install 'difftool[gui]'", file=sys.stderr)
        return 1
    problem = display_problem()
    if problem is not None:  # checked before Qt, which would abort with its own unhelpful message
        print(f"Error: {problem}", file=sys.stderr)
        return 1
    from difftool.gui.app import run_app

    return run_app(argv or [])
