"""The difftool plugin hooks. These docstrings are the plugin documentation.

A plugin is a module (or object) with functions named after these hooks and decorated with
:data:`hookimpl`, announced in its package's ``pyproject.toml``::

    [project.entry-points.difftool]
    my_plugin = "my_package.plugin"

The registration hooks receive a ``register`` callback owned by difftool: difftool records which
plugin registered what (``difftool plugins``), and refuses a duplicate name with an error naming both
plugins. A hook that raises is reported and the other plugins keep working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from difftool.core.backend import Backend
    from difftool.core.exporter import Exporter
    from difftool.core.family import ModelFamily
    from difftool.core.models import ModelSource
    from difftool.core.task import Task

hookspec = pluggy.HookspecMarker("difftool")
hookimpl = pluggy.HookimplMarker("difftool")

# --- registration: called once, when a registry is built --------------------------------------------


@hookspec
def register_tasks(register: Callable[[type[Task]], None]) -> None:
    """Register :class:`~difftool.core.task.Task` subclasses: ``register(MyTask)``.

    The task's ``name`` becomes ``difftool run NAME``; its declared ``params`` become CLI options and
    GUI fields. ``register`` checks the declaration (unique names, no clash with the common options
    ``--model --backend --device --dtype --seed --output --overwrite --json --debug``) and raises
    :class:`~difftool.core.errors.PluginError` if it is wrong.
    """


@hookspec
def register_schedulers(register: Callable[..., None]) -> None:
    """Register schedulers: ``register(name, factory, label="", summary="")``.

    ``factory(config: Mapping[str, Any]) -> Scheduler`` gets the model's training noise schedule
    (diffusers scheduler config keys: ``num_train_timesteps``, ``beta_schedule``, ``prediction_type``,
    ...) and returns a fresh :class:`~difftool.core.scheduler.Scheduler`. ``label`` is the name other
    tools use (A1111's "DPM++ 2M Karras"), written into image metadata.
    """


@hookspec
def register_backends(register: Callable[[Backend], None]) -> None:
    """Register :class:`~difftool.core.backend.Backend` instances (``torch``, ``onnx``, ``tensorrt``, ...).

    A backend that cannot run on this machine still registers, and says why through
    ``unavailable_reason(device)``; ``--backend NAME`` then fails at once with that reason. A backend
    declares its options as :class:`~difftool.core.task.Param` s in ``options`` (checked when it
    registers); users pass them as ``--backend-opt NAME=VALUE`` (``backend_options=`` in the API), the
    GUI shows them, ``difftool backends`` lists them, and ``make_denoiser`` receives their validated
    values. A ``Param`` with ``env="VAR"`` takes its default from that environment variable when set.
    The names listed in ``recorded`` enter each image's metadata (options that change the output).
    """


@hookspec
def register_exporters(register: Callable[[Exporter], None]) -> None:
    """Register :class:`~difftool.core.exporter.Exporter` instances: ``difftool export NAME [TASK]``.

    An exporter turns a task's network (``Task.export_target``: any task whose model can be exported,
    built-in or a plugin's) into an artifact for another runtime (ONNX, a TensorRT engine, a Triton
    model repository). Its declared ``options`` become the command's flags.
    """


@hookspec
def register_models(register: Callable[[ModelSource], None]) -> None:
    """Register :class:`~difftool.core.models.ModelSource` instances that list models on disk.

    ``difftool models`` shows what every source finds; ``--model NAME`` resolves a listed name.
    """


@hookspec
def register_families(register: Callable[[ModelFamily], None]) -> None:
    """Register :class:`~difftool.core.family.ModelFamily` instances: architectures other tasks run.

    A family detects its models from a file's header or a folder's config (``detect(path)``) and runs
    the tasks it names (``tasks``, e.g. ``("generate",)``) for them: ``difftool run generate --model
    flux1-dev.safetensors`` keeps ``generate``'s declared options and hands the run to the family whose
    ``detect`` recognises the model. The built-in SD3 / Flux support registers this way.
    """


@hookspec
def register_preprocessors(register: Callable[..., None]) -> None:
    """Register ControlNet preprocessors: ``register(name, function, summary="", options=())``.

    A preprocessor turns an image into a ControlNet's control image (``--control MODEL=IMAGE,pre=NAME``).
    ``function(image, mask, **options) -> numpy.ndarray`` gets the image as an H x W x 3 float32 array in
    [0, 1], the task's mask (H x W float32, 1 = repaint) or ``None`` outside ``inpaint``, and the unit's
    options; it returns an H x W x 3 float32 array (any size: it is resized to the output's), in [0, 1]
    except where a ControlNet is trained to read -1 (A1111's inpaint ControlNet: masked pixels). A
    preprocessor that needs weights (depth, pose) loads them itself, from disk, when first called.
    ``options`` are :class:`~difftool.core.task.Param` s: a unit's extra ``key=value`` fields are
    checked against them (``--control m=i.png,pre=canny,low=50``), and the validated values passed
    as keyword arguments. Raise :class:`~difftool.core.errors.ParameterError` for unusable input.
    """


# --- command line ---------------------------------------------------------------------------------


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``difftool`` Click group: ``@cli.command() def mycmd(): ...``."""
