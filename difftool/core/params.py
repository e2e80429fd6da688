"""A task's declared parameter (:class:`Param`): its type, range, default and how a value is checked.

The bottom floor of core: the task interface, the plan, the CLI's options, the GUI's forms and the server's
JSON Schema all read these declarations; this module imports nothing of difftool's but its errors. Backends'
and exporters' options are checked here too (:func:`validate_options`), and the shapes a task declares for
exported networks (:class:`ExportShapes`) live here, so task, backend and exporter import no one another.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from difftool.core.errors import ParameterError

ParamType = Literal["int", "float", "bool", "string", "choice", "image", "mask", "path", "model"]
PARAM_TYPES: tuple[str, ...] = ("int", "float", "bool", "string", "choice", "image", "mask", "path", "model")
#: Types whose value is text the file system or a model lookup reads (bounded, no NUL).
_TEXT_TYPES = ("string", "path", "choice", "model")

#: Longest text a string or path parameter takes unless it declares :attr:`Param.max_length`: every request
#: is bounded before any work (a 10 MB prompt once held a server worker for minutes).
MAX_STRING_LENGTH = 65_536


@dataclass(frozen=True)
class Param:
    """One declared task parameter.

    ``choices_from="schedulers"`` takes the choices from the registry at run time, so a plugin's
    scheduler is a valid choice for every task that declares a scheduler parameter.

    ``type="model"``: a model, named as ``difftool models`` lists it (among :attr:`families`) or by its file
    or folder; the preflight resolves it once (:class:`Resolver`), so the plan carries the resolved path (a
    :class:`~difftool.core.models.ModelRef`) and a server applies its path policy to it by this kind, whatever
    the parameter is called. :attr:`keywords` are values that name no model (``latent``, ``embedded``).

    ``multiple``: the parameter takes several values (a repeatable CLI option, one value per line in a
    form, a list in the API); its validated value is a tuple. ``parse`` turns each (already typed) value
    into the task's own type, raising :class:`ParameterError` for a bad one (ControlNet units).
    """

    name: str
    type: ParamType
    default: Any = None
    help: str = ""
    min: float | None = None
    max: float | None = None
    #: Allowed values, typed (``(2, 4)`` for an int choice); a string spelling (``"4"``) is accepted too.
    choices: tuple[Any, ...] = ()
    choices_from: Literal["schedulers"] | None = None
    required: bool = False
    multiline: bool = False
    #: Environment variable whose value, when set, replaces :attr:`default` (documented backend options).
    env: str | None = None
    multiple: bool = False
    parse: Callable[[Any], Any] | None = field(default=None, compare=False)
    #: Longest text (characters) a string or path value may have; checked before anything reads it.
    max_length: int = MAX_STRING_LENGTH
    #: A model parameter's families (:attr:`ModelEntry.family`) a listed name must have; empty: any.
    families: tuple[str, ...] = ()
    #: A model parameter's values that name no model (matched without regard to case): kept as words.
    keywords: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise TypeError(f"parameter {self.name!r}: unknown type {self.type!r}; use one of {PARAM_TYPES}")
        if self.type == "choice" and not (self.choices or self.choices_from):
            raise TypeError(f"parameter {self.name!r}: a choice needs choices or choices_from")
        if not self.name.isidentifier():
            raise TypeError(f"parameter name {self.name!r} must be a Python identifier")
        kinds = {type(c) for c in self.choices}
        if len(kinds) > 1:
            raise TypeError(f"parameter {self.name!r}: choices mix types {sorted(k.__name__ for k in kinds)}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise TypeError(f"parameter {self.name!r}: min {self.min} > max {self.max}")
        if (self.families or self.keywords) and self.type != "model":
            raise TypeError(f"parameter {self.name!r}: only a model parameter has families or keywords")

    def effective_default(self) -> Any:
        """:attr:`default`, or the value of :attr:`env` when that variable is set."""
        import os

        if self.env and os.environ.get(self.env, "") != "":
            return os.environ[self.env]
        return self.default

    def check_declaration(self, choices: Sequence[Any] | None = None) -> None:
        """Raise ``TypeError`` if the declared default is not a valid value of this parameter."""
        if self.default is None:
            return
        try:
            value = self.validate(self.default, choices)
        except ParameterError as error:
            raise TypeError(f"parameter {self.name!r}: default {self.default!r} is invalid ({error.problem})") from None
        if self.type != "path" and value != self.default:
            raise TypeError(f"parameter {self.name!r}: default {self.default!r} is not of type {self.type}")

    @property
    def flag(self) -> str:
        """The CLI spelling: ``--guidance-scale`` for ``guidance_scale``."""
        return "--" + self.name.replace("_", "-")

    def validate(self, value: Any, choices: Sequence[str] | None = None) -> Any:
        """Convert ``value`` to this parameter's type and check its range, or raise :class:`ParameterError`."""
        if self.multiple:
            if value is None or value == "":
                values: list[Any] = []
            elif isinstance(value, str):  # a form's text: one value per line
                values = [line.strip() for line in value.splitlines() if line.strip()]
            elif isinstance(value, (list, tuple)):
                values = list(value)
            else:
                values = [value]
            if self.required and not values:
                raise ParameterError(f"{self.flag} is required", f"pass {self.flag} ({self.help or self.type})")
            return tuple(self._validate_one(v, choices) for v in values)
        return self._validate_one(value, choices)

    def _validate_one(self, value: Any, choices: Sequence[str] | None = None) -> Any:
        if value is None:
            if self.required:
                raise ParameterError(f"{self.flag} is required", f"pass {self.flag} ({self.help or self.type})")
            return None
        fix = f"pass {self.flag} {self.range_text()}".rstrip()
        if isinstance(value, str) and self.type in _TEXT_TYPES:
            if len(value) > self.max_length:  # before anything reads it (tokenizers, parsers, the file system)
                raise ParameterError(
                    f"{self.flag} is {len(value)} characters long, over its limit of {self.max_length}",
                    f"shorten {self.flag}",
                )
            if "\x00" in value:  # no file name, model name or prompt holds one; os.stat would raise ValueError
                raise ParameterError(f"{self.flag} contains a NUL character", f"remove it from {self.flag}")
        try:
            if self.type == "int":
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif self.type == "float":
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
            elif self.type == "bool":
                if isinstance(value, str):
                    if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError
                    value = value.lower() in ("1", "true", "yes", "on")
                value = bool(value)
            elif self.type == "string":
                if self.parse is None:  # parse reads its own forms (mappings for ControlNet units)
                    if not isinstance(value, (str, int, float, Path)):
                        raise TypeError
                    value = str(value)
            elif self.type == "path":
                if isinstance(value, (str, Path)):
                    value = Path(value)
                elif not _in_memory_image(value):  # an image its caller loaded (and bounded): a server's
                    raise TypeError
            elif self.type == "model":
                if not isinstance(value, (str, Path)):
                    raise TypeError
                value = value if isinstance(value, str) else str(value)  # a resolved ModelRef stays one
                value = next((k for k in self.keywords if k.lower() == value.lower()), value)
                if not value:  # an emptied form field: the default (a required one is then missing)
                    return self._validate_one(self.default or None, choices)
        except (TypeError, ValueError, OverflowError):
            raise ParameterError(f"{self.flag}: {_shown(value)} is not a valid {self.type}", fix) from None
        if self.type == "float" and not math.isfinite(value):
            # NaN compares False with everything, so it would pass every range check below.
            raise ParameterError(f"{self.flag}: {value} is not a finite number", fix)
        if self.type in ("int", "float"):
            if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
                raise ParameterError(f"{self.flag} {value} is out of range {self.range_text()}", fix)
        if self.type == "choice":
            allowed = tuple(choices if choices is not None else self.choices)
            match = next((c for c in allowed if c == value and type(c) is type(value)), None)
            if match is None:  # "4" from a CLI, a form or JSON names the int choice 4
                match = next((c for c in allowed if str(c) == str(value)), None)
            if match is None:
                raise ParameterError(
                    f"{self.flag}: unknown value {_shown(value)}", f"use one of {', '.join(map(str, allowed))}"
                )
            value = match
        return self.parse(value) if self.parse is not None else value

    def range_text(self) -> str:
        """The declared range as text (``in [1, 50]``, ``>= 0``), for help and error messages."""
        if self.min is not None and self.max is not None:
            return f"in [{self.min:g}, {self.max:g}]"
        if self.min is not None:
            return f">= {self.min:g}"
        if self.max is not None:
            return f"<= {self.max:g}"
        return ""


class Resolver(Protocol):
    """How the preflight turns what a request names into what a run reads: the registry's resolver on this
    machine (:class:`difftool.app.plan.LocalResolver`), a server's path policy for its requests."""

    def model(self, name: str, families: Sequence[str], what: str) -> str:
        """The model ``name`` names (a :class:`~difftool.core.models.ModelRef`), or a one-line error."""
        ...

    def file(self, path: str | Path, what: str) -> Path:
        """The file ``path`` names, checked (it exists; a server: inside its allowed folders)."""
        ...


@runtime_checkable
class Resolvable(Protocol):
    """A structured value (a ControlNet unit, LoRA specs) that names models or files: ``resolved`` returns
    it with each name resolved through ``resolver`` (its syntax is parsed once, by the parameter's parse)."""

    def resolved(self, resolver: Resolver) -> Any: ...


def resolve_value(param: Param, value: Any, resolver: Resolver) -> Any:
    """``value`` (validated) with the models and files it names resolved: a model parameter's name, and the
    names inside structured values (:class:`Resolvable`); other values unchanged."""
    if value is None:
        return None
    if param.multiple and isinstance(value, tuple):
        return tuple(_resolve_one(param, item, resolver) for item in value)
    return _resolve_one(param, value, resolver)


def _resolve_one(param: Param, value: Any, resolver: Resolver) -> Any:
    if param.type == "model":
        return value if value in param.keywords else resolver.model(value, param.families, param.flag)
    if isinstance(value, Resolvable):
        return value.resolved(resolver)
    return value


def _in_memory_image(value: Any) -> bool:
    """Whether ``value`` is a :class:`~difftool.core.images.LoadedImage` (an inline ``--reference`` a server decoded
    within its limits); imported only then, as numpy and Pillow are heavy."""
    if type(value).__name__ != "LoadedImage":
        return False
    from difftool.core.images import LoadedImage

    return isinstance(value, LoadedImage)


def _shown(value: Any) -> str:
    """``repr(value)``, cut short: an error message stays one readable line whatever a request sent."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Params(Mapping[str, Any]):
    """A request's validated parameters: every declared name present, defaults applied, values typed, frozen.

    Tasks read ``params.steps`` (or ``params["steps"]``), never ``params.get("steps", 25)``: the default is
    stated once, in the :class:`Param` declaration, and applied by the preflight. ``replace`` makes a copy
    with some values changed (the run's loaded images, a second pass's size).
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_values", dict(values or {}))

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no parameter {name!r}; declared: {', '.join(self._values) or 'none'}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Params are frozen; use params.replace(name=value)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._values) == dict(other)

    __hash__ = None  # type: ignore[assignment]  # values may be unhashable (tuples of units hold images)

    def __repr__(self) -> str:
        return f"Params({self._values!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable for Ray and worker processes
        return (Params, (self._values,))

    def replace(self, **changes: Any) -> Params:
        """A copy with ``changes`` applied (only declared names: a typo is an error, not a new value)."""
        unknown = sorted(set(changes) - set(self._values))
        if unknown:
            raise KeyError(f"no parameter {unknown[0]!r}")
        return Params({**self._values, **changes})

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


@dataclass(frozen=True)
class ExportShapes:
    """What a task will ask of an exported denoiser, declared so engines are built for it before any work.

    Each field is (min, opt, max). ``size`` is the square side of the sample in the denoiser's own
    units (pixels for pixel models, latent cells for Stable Diffusion: 512 px is 64); ``batch``
    counts classifier-free guidance's doubled batch; ``tokens`` is the text length.
    """

    batch: tuple[int, int, int] = (1, 1, 1)
    size: tuple[int, int, int] = (64, 512, 1024)
    tokens: tuple[int, int, int] = (77, 77, 77)

    def __post_init__(self) -> None:
        for name in ("batch", "size", "tokens"):
            low, opt, high = getattr(self, name)
            if not 1 <= low <= opt <= high:
                raise ValueError(f"ExportShapes.{name} must be 1 <= min <= opt <= max, got {(low, opt, high)}")


def validate_options(
    owner: str, declared: tuple[Param, ...], values: Mapping[str, Any] | None, flag: str
) -> dict[str, Any]:
    """``values`` checked against ``declared`` options, defaults (or their environment variables) filled in.

    ``owner`` names whose options they are in errors (``backend 'onnx'``); ``flag`` is how users pass one.
    """
    values = dict(values or {})
    params = {p.name: p for p in declared}
    unknown = sorted(set(values) - set(params))
    if unknown:
        names = ", ".join(params) or "none"
        raise ParameterError(f"{owner} has no option {unknown[0]!r}", f"its options are: {names}")
    resolved = {}
    for name, param in params.items():
        raw = values[name] if name in values else param.effective_default()
        try:
            resolved[name] = param.validate(raw)
        except ParameterError as error:
            source = f" (from {param.env})" if name not in values and param.env else ""
            detail = error.problem.removeprefix(f"{param.flag}: ").replace(f"{param.flag} ", f"{name}=", 1)
            raise ParameterError(
                f"{owner} option {name}{source}: {detail}",
                f"pass {flag} {name}=VALUE {param.range_text() or (f'({error.fix})' if error.fix else '')}".rstrip(),
            ) from None
    return resolved
