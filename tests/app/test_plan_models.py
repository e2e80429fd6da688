"""The preflight resolves every model a request names once, through one resolver: the plan carries the
resolved paths (:class:`ModelRef`: the name as given, for records, and the path, for the run)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from difftool.app.plan import preflight
from difftool.core.errors import ModelError, ParameterError
from difftool.core.models import ModelEntry, ModelRef
from difftool.core.task import Param, Task, TaskResult
from difftool.plugins import hookimpl
from difftool.plugins.builtin.sd.lora import Loras
from difftool.plugins.registry import build_registry


class Weighted(Task):
    """A plugin task with its own model parameter."""

    name, summary = "weighted", "a task with a model parameter"
    params = (Param("weights", "model", families=("upscaler",), keywords=("none",)),)

    def run(self, request, context):  # pragma: no cover - only preflighted here
        return TaskResult([])


class Plugin:
    @hookimpl
    def register_tasks(self, register):
        register(Weighted)


@pytest.fixture
def registry(tmp_path: Path):
    files = {name: tmp_path / f"{name}.safetensors" for name in ("4x-ink", "ink", "dreamy", "xl-refiner")}
    for path in files.values():
        path.write_bytes(b"\0")
    registry = build_registry([Plugin()], entry_points=False)
    entries = [
        ModelEntry("4x-ink", files["4x-ink"], "upscaler", "test"),
        ModelEntry("ink", files["ink"], "lora", "test"),
        ModelEntry("dreamy", files["dreamy"], "sd1", "test"),
        ModelEntry("xl-refiner", files["xl-refiner"], "sdxl-refiner", "test"),
    ]
    registry.find_models = lambda: entries  # type: ignore[method-assign]
    registry.files = files
    return registry


def test_the_plan_carries_resolved_models(registry) -> None:
    plan = preflight(
        "generate",
        model="dreamy",
        params={"prompt": "x", "hires": 2.0, "hires_upscaler": "4x-ink", "refiner": "xl-refiner", "lora": "ink:0.5"},
        registry=registry,
    )
    files = registry.files
    assert isinstance(plan.model, ModelRef) and plan.model == "dreamy" and plan.model.path == files["dreamy"]
    upscaler, refiner = plan.params["hires_upscaler"], plan.params["refiner"]
    assert (upscaler, upscaler.path) == ("4x-ink", files["4x-ink"])  # records show the name, runs load the path
    assert (refiner, refiner.path) == ("xl-refiner", files["xl-refiner"])
    loras = plan.params["lora"]
    assert isinstance(loras, Loras) and loras == "ink:0.5" and loras.specs[0].path == files["ink"]
    again = pickle.loads(pickle.dumps(plan.params))  # a Ray worker gets the same resolved values
    assert again["lora"].specs[0].path == files["ink"] and again["refiner"].path == files["xl-refiner"]


def test_keywords_stay_words_and_a_form_may_spell_them_in_any_case(registry) -> None:
    plan = preflight("generate", model="dreamy", params={"prompt": "x", "hires_upscaler": "Latent"}, registry=registry)
    assert plan.params["hires_upscaler"] == "latent" and not isinstance(plan.params["hires_upscaler"], ModelRef)
    assert preflight("weighted", params={"weights": "none"}, registry=registry).params["weights"] == "none"


def test_models_are_resolved_against_their_families(registry) -> None:
    with pytest.raises(ModelError, match="--refiner 'dreamy' is a sd1 model, not sdxl-refiner"):
        preflight("generate", model="dreamy", params={"prompt": "x", "refiner": "dreamy"}, registry=registry)
    with pytest.raises(ModelError, match="model 'xl-refiner' is a sdxl-refiner model, not sd1 or"):
        preflight("generate", model="xl-refiner", params={"prompt": "x"}, registry=registry)  # the task's families
    with pytest.raises(ModelError, match="--weights 'ink' is a lora model, not upscaler"):
        preflight("weighted", params={"weights": "ink"}, registry=registry)  # a plugin's own parameter too
    with pytest.raises(ModelError, match=r"LoRA 'nope' not found \(listed: ink\)"):
        preflight("generate", model="dreamy", params={"prompt": "x", "lora": "nope"}, registry=registry)
    assert preflight("weighted", params={"weights": "4x-ink"}, registry=registry).params["weights"] == "4x-ink"


def test_a_model_parameter_is_text_with_families_only_when_declared_so() -> None:
    with pytest.raises(TypeError, match="only a model parameter has families"):
        Param("weights", "string", families=("upscaler",))
    with pytest.raises(ParameterError, match="is not a valid model"):
        Weighted.param("weights").validate(3)
