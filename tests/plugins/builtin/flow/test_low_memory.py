"""Low-memory mode (``--backend-opt offload=model``): text encoders freed after encoding, same pixels."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from difftool.app import api
from difftool.plugins.builtin.flow import pipeline

from . import tiny


def run(model: Path, **options: Any) -> Image.Image:
    return api.run("generate", model=str(model), seed=3, prompt="a lighthouse", width=32, height=32, steps=2,
                   guidance_scale=3.5, dtype="fp32", backend_options=options or None).images[0]  # fmt: skip


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_flux_comfy(tiny.flux(seed=11), tmp_path_factory.mktemp("lowmem"))


def test_low_memory_frees_the_text_encoders_and_changes_no_pixel(flux_file: Path, monkeypatch) -> None:
    seen: list[weakref.ref] = []
    encode = pipeline.encode

    def watched(model, *args, **kwargs):
        seen.extend(weakref.ref(encoder) for encoder in model.encoders.values())
        return encode(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "encode", watched)
    full = run(flux_file)
    gc.collect()
    assert len(seen) == 2 and all(ref() is not None for ref in seen)  # kept for the next run
    seen.clear()
    low = run(flux_file, offload="model")
    gc.collect()
    assert len(seen) == 2 and all(ref() is None for ref in seen)  # clip_l and T5 are gone
    again = run(flux_file, offload="model")  # the next run loads them again
    assert np.asarray(full).std() > 1
    assert np.array_equal(np.asarray(full), np.asarray(low)) and np.array_equal(np.asarray(low), np.asarray(again))


def test_offload_is_a_declared_torch_backend_option(flux_file: Path) -> None:
    from difftool.core.errors import ParameterError

    with pytest.raises(ParameterError, match="offload"):
        run(flux_file, offload="everything")
