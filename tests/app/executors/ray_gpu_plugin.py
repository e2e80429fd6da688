"""Test-only plugin: a Ray worker that imports it gets the GPU stand-ins (CUDA runtime and tensorrt).

In the driver (already inside ``gpu_harness``) it changes nothing.
"""

from __future__ import annotations

from difftool.core.cuda import runtime

if not runtime().fake:
    from difftool.testing.gpu import install_for_process

    install_for_process()
