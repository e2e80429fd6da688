"""``difftool serve``: an HTTP API over the same preflight and runtime as the CLI and the GUI.

Needs ``pip install "difftool[serve]"`` (FastAPI, uvicorn). Nothing here is imported by ``import difftool``:
:mod:`difftool.serve.command` holds the Click command and imports FastAPI only when the server starts.

- :mod:`~difftool.serve.settings`: what the operator chose (host, token, allowed paths, limits);
- :mod:`~difftool.serve.security`: who may call, which files and models a request may name;
- :mod:`~difftool.serve.job_queue`: the bounded queue and one worker thread per device;
- :mod:`~difftool.serve.native`: the ``/v1`` routes, generated from task declarations;
- :mod:`~difftool.serve.a1111`: the AUTOMATIC1111 ``/sdapi/v1`` subset;
- :mod:`~difftool.serve.app`: the FastAPI application that puts them together;
- :mod:`~difftool.serve.ray_serve`, :mod:`~difftool.serve.ray_worker`, :mod:`~difftool.serve.board`: the same
  application on Ray Serve (``--ray``, needs ``difftool[serve,ray]``), its model replicas and shared job board.
"""
