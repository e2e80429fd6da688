"""A third model family, PixArt-Sigma, through the ``register_families`` hook difftool's own SD3 / Flux use.

``difftool run generate --model PIXART_FOLDER`` (a diffusers folder such as
``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS``, tokenizer included): the ``generate`` task sees a model this
family recognises and hands it the run. This module stays light (listing tasks must not import torch);
:mod:`difftool_plugin_example.pixart_run` does the work with diffusers' parts and difftool's core sampler.
"""

from __future__ import annotations

import json
from pathlib import Path

from difftool.core.family import ModelFamily
from difftool.core.task import RunContext, TaskRequest, TaskResult


class PixArtSigma(ModelFamily):
    """Detects a diffusers PixArt-Sigma folder by its ``model_index.json``; runs ``generate`` for it."""

    name = "example-pixart"
    families = ("pixart-sigma",)
    tasks = ("generate",)

    def detect(self, path: Path) -> str | None:
        index = Path(path) / "model_index.json"
        if not index.is_file():
            return None
        try:
            pipeline = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError):
            return None
        return "pixart-sigma" if pipeline == "PixArtSigmaPipeline" else None

    def run(self, task: str, request: TaskRequest, context: RunContext) -> TaskResult:
        from difftool_plugin_example.pixart_run import generate

        return generate(request, context)
