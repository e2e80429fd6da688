import math
from pathlib import Path

import pytest

from difftool.core.errors import ParameterError
from difftool.core.task import Param


def test_int_range_and_conversion() -> None:
    p = Param("steps", "int", default=4, min=1, max=50)
    assert p.validate("7") == 7
    with pytest.raises(ParameterError, match=r"--steps 0 is out of range in \[1, 50\]"):
        p.validate(0)
    with pytest.raises(ParameterError, match="not a valid int"):
        p.validate(2.5)


def test_float_bool_string_path_choice() -> None:
    assert Param("s", "float", min=0, max=1).validate("0.25") == 0.25
    assert Param("b", "bool").validate("yes") is True
    assert Param("b", "bool").validate(0) is False
    with pytest.raises(ParameterError):
        Param("b", "bool").validate("maybe")
    assert Param("p", "path").validate("a/b") == Path("a/b")
    c = Param("scale", "choice", choices=("2", "4"))
    assert c.validate("4") == "4"
    with pytest.raises(ParameterError, match="use one of 2, 4"):
        c.validate("3")


def test_required_and_flag_spelling() -> None:
    p = Param("guidance_scale", "float", required=True)
    assert p.flag == "--guidance-scale"
    with pytest.raises(ParameterError, match="--guidance-scale is required"):
        p.validate(None)


def test_bad_declarations_fail_at_definition() -> None:
    with pytest.raises(TypeError, match="unknown type"):
        Param("x", "complex")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="choices"):
        Param("x", "choice")
    with pytest.raises(TypeError, match="identifier"):
        Param("not-an-identifier", "int")


def _float_params() -> list[tuple[str, Param]]:
    from difftool.plugins.registry import build_registry

    registry = build_registry(["difftool_plugin_example"], entry_points=False)
    return [(name, p) for name in sorted(registry.tasks) for p in registry.task(name).params if p.type == "float"]


FLOAT_PARAMS = _float_params()


def test_every_task_declares_float_parameters_to_check() -> None:
    names = {f"{task}.{p.name}" for task, p in FLOAT_PARAMS}
    assert {"generate.guidance_scale", "generate.hires", "style.strength", "upscale-sd.scale"} <= names


@pytest.mark.parametrize(("task", "param"), FLOAT_PARAMS, ids=[f"{t}.{p.name}" for t, p in FLOAT_PARAMS])
def test_no_float_parameter_takes_nan_or_inf(task: str, param: Param) -> None:
    """Issue 29 (items 7, 15): NaN compares False with every bound, so it passed every range check."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf"), "nan", "NaN", "inf", "-Infinity"])

    @settings(max_examples=20, deadline=None)
    @given(value=non_finite | st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**400), 10**400))
    def check(value: object) -> None:
        try:
            result = param.validate(value)
        except ParameterError as error:
            assert param.flag in str(error) and "\n" not in str(error)
            return
        assert isinstance(result, float) and math.isfinite(result)
        assert (param.min is None or result >= param.min) and (param.max is None or result <= param.max)

    check()
    for value in (float("nan"), "nan", float("inf"), "-inf"):
        with pytest.raises(ParameterError, match="not a finite number"):
            param.validate(value)


def test_strings_are_bounded_and_nul_free() -> None:
    text = Param("text", "string")
    assert text.validate("x" * 65_536) == "x" * 65_536
    with pytest.raises(ParameterError, match="over its limit of 65536"):
        text.validate("x" * 65_537)
    with pytest.raises(ParameterError, match="NUL character"):
        Param("vae", "path").validate("model\x00.safetensors")
    with pytest.raises(ParameterError, match="not a valid string"):
        text.validate({"nested": [1, 2]})
    with pytest.raises(ParameterError, match="not a valid int"):
        Param("steps", "int").validate(float("inf"))
