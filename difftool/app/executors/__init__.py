"""Where a folder job runs: ``local`` (:mod:`.local`, one process) or ``ray`` (:mod:`.ray_data`, Ray Data).

Executors only schedule :func:`difftool.app.folder_jobs.process_item` calls; what an item does is the same
everywhere, so outputs are identical whichever runs them.
"""
