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
