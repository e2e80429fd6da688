"""``python -m difftool`` is the ``difftool`` command."""

from difftool.cli import main

main()
