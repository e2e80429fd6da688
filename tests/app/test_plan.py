"""The plan carries typed, complete, frozen parameters; cross-field checks run at preflight (issue 31)."""

import ast
import pickle
from pathlib import Path

import pytest

from difftool.app import api
from difftool.app.plan import preflight
from difftool.core.errors import ParameterError, PluginError
from difftool.core.params import Params
from difftool.core.task import Param, Task, TaskResult
from difftool.plugins import hookimpl
from difftool.plugins.registry import build_registry

PACKAGE = Path(__file__).resolve().parents[2] / "difftool"


def test_plan_params_are_frozen_complete_typed_and_picklable(registry) -> None:
    plan = preflight("superres", params={"scale": "2", "steps": None}, registry=registry)
    params = plan.params
    assert isinstance(params, Params)
    assert list(params) == [p.name for p in registry.task("superres").params]  # every declared name
    # defaults applied (a None is "not given"), and the CLI's "2" is the int choice 2
    assert params == {"scale": 2, "steps": None, "scheduler": None, "tile": 1024, "overlap": 64, "keep_mode": False}
    assert params.scale == 2 and type(params.scale) is int and params["tile"] == 1024
    with pytest.raises(AttributeError, match="frozen"):
        params.tile = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        params["tile"] = 8  # type: ignore[index]
    assert params.replace(tile=512).tile == 512 and params.tile == 1024
    # Ray ships a plan's request fields and params to a worker, which preflights them again there
    spec = pickle.loads(pickle.dumps({"fields": plan.request_fields(), "params": params}))
    assert isinstance(spec["params"], Params) and spec["params"] == params
    again = preflight("superres", params=spec["params"], registry=registry, **spec["fields"])
    assert again.params == params


def test_a_none_value_takes_the_declared_default(registry) -> None:
    plan = preflight("superres", params={"tile": None, "keep_mode": None}, registry=registry)
    assert plan.params.tile == 1024 and plan.params.keep_mode is False


class ReadsUndeclared(Task):
    name = "reads-undeclared"
    summary = "Reads a parameter it never declared"
    params = (Param("level", "int", default=3),)

    def run(self, request, context):
        return TaskResult([request.inputs["image"].to_pil()], {"typo": request.params.levle})


class ReadsUndeclaredPlugin:
    @hookimpl
    def register_tasks(self, register):
        register(ReadsUndeclared)


def test_a_task_reading_an_undeclared_parameter_fails_loudly(photo: Path) -> None:
    registry = build_registry([ReadsUndeclaredPlugin()], entry_points=False)
    assert preflight("reads-undeclared", registry=registry).params.level == 3
    with pytest.raises(PluginError, match=r"AttributeError: no parameter 'levle'; declared: level"):
        api.run("reads-undeclared", photo, registry=registry)
    with pytest.raises(KeyError):
        preflight("reads-undeclared", registry=registry).params.replace(levle=1)


def test_superres_overlap_not_below_tile_fails_at_preflight_before_any_model_loads(
    photo: Path, superres_model: Path, registry, monkeypatch
) -> None:
    from difftool.plugins.builtin import pixel_model, upscalers

    def no_load(*args, **kwargs):
        raise AssertionError("a model loaded before the parameters were checked")

    monkeypatch.setattr(pixel_model, "load_pixel_model", no_load)
    monkeypatch.setattr(upscalers, "load_upscaler", no_load)
    with pytest.raises(ParameterError, match="--overlap 64 must be smaller than --tile 64"):
        preflight("superres", model=str(superres_model), params={"tile": 64, "overlap": 64}, registry=registry)
    with pytest.raises(ParameterError, match="--overlap 512 must be smaller than --tile 256"):
        api.run("superres", photo, model=str(superres_model), tile=256, overlap=512, registry=registry)


def test_upscale_sd_tile_checks_run_at_preflight(registry) -> None:
    with pytest.raises(ParameterError, match="--tile 500 must be a multiple of 8"):
        preflight("upscale-sd", model="any.safetensors", params={"tile": 500}, registry=registry)
    with pytest.raises(ParameterError, match="larger than --overlap 128"):
        preflight("upscale-sd", model="any.safetensors", params={"tile": 128, "overlap": 128}, registry=registry)


def _restated_defaults(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    """``params.get(...)`` / ``X.params.get(...)`` calls in ``path``: a task's validated parameters are read as
    ``params.name`` (every declared name is present, its default applied by the preflight)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            owner = node.func.value
            if (isinstance(owner, ast.Name) and owner.id == "params") or (
                isinstance(owner, ast.Attribute) and owner.attr == "params"
            ):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_no_front_end_or_plugin_restates_a_parameter_default() -> None:
    files = [f for folder in ("plugins", "serve", "gui") for f in sorted((PACKAGE / folder).rglob("*.py"))]
    assert len(files) > 20  # the scan sees the packages
    found = [hit for f in files for hit in _restated_defaults(f)]
    assert found == [], f"read validated parameters as params.name, not params.get(name, default): {found}"


def test_the_guard_catches_a_restated_default(tmp_path: Path) -> None:
    sample = tmp_path / "task.py"
    sample.write_text(
        "def run(request, params, body):\n"
        "    a = params.get('steps', 25)\n"
        "    b = request.params.get('tile') or 1024\n"
        "    return params.steps, body.get('steps', 25)\n"  # a raw request body may use get
    )
    assert _restated_defaults(sample, tmp_path) == ["task.py:2", "task.py:3"]
