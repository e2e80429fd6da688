from pathlib import Path

import pytest
from PIL import Image

from difftool.app import api
from difftool.core.errors import Cancelled, ParameterError
from difftool.core.task import CancelToken


def test_run_returns_images_and_record(photo: Path, superres_model: Path, registry) -> None:
    result = api.run("superres", photo, model=str(superres_model), scale="2", seed=3, registry=registry)
    assert result.image.size == (56, 40)
    assert result.record["seed"] == 3 and result.record["scale"] == 2 and result.record["task"] == "superres"
    assert result.record["dtype"] in ("fp32", "bf16")
    assert result.record["scheduler_label"] == "DDIM"


def test_same_seed_same_image(photo: Path, superres_model: Path, registry) -> None:
    a = api.run("superres", photo, model=str(superres_model), scale="2", seed=3, registry=registry, dtype="fp32")
    b = api.run("superres", photo, model=str(superres_model), scale="2", seed=3, registry=registry, dtype="fp32")
    c = api.run("superres", photo, model=str(superres_model), scale="2", seed=4, registry=registry, dtype="fp32")
    assert a.image.tobytes() == b.image.tobytes() != c.image.tobytes()


def test_cancel_from_another_place_stops_within_a_step(photo: Path, superres_model: Path, registry) -> None:
    token, steps = CancelToken(), []

    def progress(step: int, total: int, preview) -> None:
        steps.append(step)
        token.cancel()

    with pytest.raises(Cancelled):
        api.run(
            "superres",
            photo,
            model=str(superres_model),
            scale="2",
            steps=8,
            cancel=token,
            progress=progress,
            registry=registry,
        )
    assert steps == [1]


def test_previews_arrive_on_schedule(photo: Path, superres_model: Path, registry) -> None:
    previews = []
    api.run(
        "superres",
        photo,
        model=str(superres_model),
        scale="2",
        steps=4,
        preview_every=2,
        registry=registry,
        progress=lambda s, n, p: previews.append((s, p)),
    )
    assert [s for s, p in previews if p is not None] == [2, 4]
    assert all(isinstance(p, Image.Image) and p.size == (56, 40) for s, p in previews if p is not None)


def test_unknown_parameter_and_input_count(photo: Path, superres_model: Path, registry) -> None:
    with pytest.raises(ParameterError, match="has no parameter 'strenght'"):
        api.run("superres", photo, model=str(superres_model), strenght=0.5, registry=registry)
    with pytest.raises(ParameterError, match="takes 1 input"):
        api.run("superres", photo, photo, model=str(superres_model), registry=registry)


def test_cancel_during_model_load_stops_before_work_and_the_next_run_works(
    superres_model: Path, photo: Path, monkeypatch
) -> None:
    from difftool.core.errors import Cancelled
    from difftool.core.task import CancelToken
    from difftool.plugins.builtin import pixel_model

    token = CancelToken()
    real_load = pixel_model.load_pixel_model
    steps = []

    def load_then_cancel(path, task, variant=None):
        model = real_load(path, task, variant)
        token.cancel()  # the user pressed cancel while the model was loading
        return model

    monkeypatch.setattr(pixel_model, "load_pixel_model", load_then_cancel)
    with pytest.raises(Cancelled):
        api.run(
            "superres", photo, model=str(superres_model), scale="2", cancel=token, progress=lambda *a: steps.append(a)
        )
    assert steps == []  # no denoising step ran
    monkeypatch.setattr(pixel_model, "load_pixel_model", real_load)
    assert api.run("superres", photo, model=str(superres_model), scale="2", seed=1).image.size[0] > 0


def test_a_low_precision_run_never_rounds_the_cached_model(superres_model: Path, photo: Path) -> None:
    """bf16 then fp32 in one process (the GUI, a batch): the fp32 result equals a fresh fp32 run."""
    from difftool.plugins.builtin import pixel_model

    pixel_model._loaded().clear()
    common = dict(model=str(superres_model), scale="2", seed=4)
    fresh = api.run("superres", photo, dtype="fp32", **common).image.tobytes()
    api.run("superres", photo, dtype="bf16", **common)
    assert next(iter(pixel_model._loaded().values())).unet.dtype.is_floating_point
    assert str(next(iter(pixel_model._loaded().values())).unet.dtype) == "torch.float32"
    assert api.run("superres", photo, dtype="fp32", **common).image.tobytes() == fresh


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ({"seed": "abc"}, r"seed 'abc' is not an integer; pass an integer from 0 to"),
        ({"seed": 1.5}, r"seed 1.5 is not an integer"),
        ({"seed": -1}, r"seed -1 is outside 0\.\."),
        ({"model": 5}, r"model 5 \(int\) is not a model name or path; pass model="),
    ],
)
def test_a_wrong_seed_or_model_type_is_a_parameter_error(photo: Path, registry, given: dict, problem: str) -> None:
    """Issue 29 item 17: ``seed="abc"`` raised a bare ValueError, ``model=5`` a TypeError blamed on the plugin."""
    with pytest.raises(ParameterError, match=problem):
        api.run("superres", photo, registry=registry, **given)
    assert api.run("superres", photo, registry=registry, scale=2, seed="7").record["seed"] == 7  # a CLI-style string
