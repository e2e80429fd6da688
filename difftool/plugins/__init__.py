"""Tasks, schedulers, backends, model sources and CLI commands all arrive through pluggy hooks.

:mod:`difftool.plugins.hookspecs` documents the hooks; :mod:`difftool.plugins.registry` builds a
:class:`~difftool.plugins.registry.Registry` from the built-in plugins (:mod:`difftool.plugins.builtin`)
and the ``difftool`` entry-point group.
"""

from difftool.plugins.hookspecs import hookimpl

__all__ = ["hookimpl"]
