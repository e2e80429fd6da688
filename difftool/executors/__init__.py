"""Where a folder job runs: ``local`` (the CLI's loop, in :mod:`difftool.cli`) or ``ray`` (Ray Data).

Executors only schedule :func:`difftool.jobs.process_item` calls; what an item does is the same
everywhere, so outputs are identical whichever runs them.
"""
