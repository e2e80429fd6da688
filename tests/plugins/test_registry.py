import importlib.metadata
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from difftool.core.errors import ModelError
from difftool.core.task import Param, Task, TaskResult
from difftool.plugins import hookimpl
from difftool.plugins.registry import DEFAULT_PLUGINS, build_registry, get_registry, plugins_disabled

EXAMPLE_SRC = Path(__file__).resolve().parents[2] / "examples" / "difftool-plugin-example" / "src"


def fake_distribution(root: Path, name: str, entry_points: dict[str, str]) -> None:
    """A real installed-distribution record (dist-info) that importlib.metadata discovers on sys.path."""
    info = root / f"{name.replace('-', '_')}-0.3.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3.0\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[difftool]\n{lines}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path where tests create plugin modules and their dist-info records."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith(("shout_plugin", "broken_plugin"))]:
        del sys.modules[name]


SHOUT_PLUGIN = """
from difftool.core.task import Task, TaskResult
from difftool.plugins import hookimpl

class Shout(Task):
    name = "shout"
    summary = "Return the input, loudly"
    def run(self, request, context):
        return TaskResult([request.inputs["image"].to_pil()])

@hookimpl
def register_tasks(register):
    register(Shout)
"""


@pytest.fixture
def example_plugin_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example plugin, found through its real entry point: installed (README's test command) or, when
    this suite runs without it, through a dist-info record of the same entry point."""
    try:
        importlib.metadata.distribution("difftool-plugin-example")
    except importlib.metadata.PackageNotFoundError:
        monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
        monkeypatch.syspath_prepend(str(tmp_path))
        fake_distribution(tmp_path, "difftool-plugin-example", {"example": "difftool_plugin_example"})


def test_builtins_register_through_the_hooks(registry) -> None:
    assert {"superres", "inpaint"} <= set(registry.tasks)
    assert registry.tasks["superres"].plugin in DEFAULT_PLUGINS
    assert registry.schedulers["ddim"].plugin == "difftool.plugins.builtin.schedulers"
    assert all(registry.plugins[name].builtin for name in DEFAULT_PLUGINS)
    assert registry.failures == []


def test_every_kind_is_an_entry_of_value_and_plugin(registry) -> None:
    from difftool.core.backend import Backend
    from difftool.core.exporter import Exporter
    from difftool.core.models import ModelSource
    from difftool.core.task import Entry, RegistryView

    assert isinstance(registry, RegistryView)
    kinds = {
        "tasks": type,
        "backends": Backend,
        "exporters": Exporter,
        "model_sources": ModelSource,
        "schedulers": object,
        "preprocessors": object,
    }
    for kind, value_type in kinds.items():
        entries = getattr(registry, kind)
        assert entries, kind
        for entry in entries.values():
            assert isinstance(entry, Entry) and isinstance(entry.value, value_type), (kind, entry)
            assert entry.plugin in DEFAULT_PLUGINS, (kind, entry)
    assert registry.backend("onnx") is registry.backends["onnx"].value
    assert registry.task("superres").__class__ is registry.tasks["superres"].value
    assert callable(registry.schedulers["ddim"].value) and callable(registry.preprocessors["canny"].value)
    # A task offers its network for export by declaring it, not by overriding a method someone compares.
    from difftool.plugins.builtin.exporters import exportable_tasks

    assert exportable_tasks(registry) == sorted(n for n, e in registry.tasks.items() if e.value.exports)
    assert {"superres", "inpaint", "generate", "style"} <= set(exportable_tasks(registry))
    assert "upscale-sd" not in exportable_tasks(registry)


def test_entry_point_plugin_is_discovered(site: Path) -> None:
    (site / "shout_plugin.py").write_text(SHOUT_PLUGIN)
    fake_distribution(site, "shout-plugin", {"shout": "shout_plugin"})
    registry = build_registry()
    assert registry.tasks["shout"].plugin == "shout"
    assert registry.plugins["shout"].version == "0.3.0" and not registry.plugins["shout"].builtin
    assert [f for f in registry.failures if f.plugin == "shout"] == []


def test_example_plugin_runs_through_its_entry_point_and_the_cli(
    example_plugin_installed: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from difftool import cli

    monkeypatch.setenv("DIFFTOOL_NO_PLUGINS", "0")
    registry = build_registry()
    assert registry.tasks["posterize"].plugin == "example"
    assert registry.schedulers["ddim-trailing"].plugin == "example"
    Image.linear_gradient("L").save(tmp_path / "in.png")
    listing = CliRunner().invoke(cli.cli, ["tasks"], obj=registry)
    assert "posterize" in listing.output
    result = CliRunner().invoke(cli.cli, ["run", "posterize", str(tmp_path / "in.png"), "--levels", "2"], obj=registry)
    assert result.exit_code == 0, result.output
    assert set(np.unique(np.asarray(Image.open(tmp_path / "in.posterize.png").convert("L")))) == {0, 255}


def test_plugin_that_fails_to_import_is_reported_and_others_work(site: Path) -> None:
    (site / "broken_plugin.py").write_text("raise ImportError('needs libfoo 2.0')\n")
    fake_distribution(site, "broken-plugin", {"broken": "broken_plugin"})
    (site / "shout_plugin.py").write_text(SHOUT_PLUGIN)
    fake_distribution(site, "shout-plugin", {"shout": "shout_plugin"})
    registry = build_registry()
    assert "shout" in registry.tasks and "superres" in registry.tasks
    [failure] = [f for f in registry.failures if f.plugin == "broken"]
    assert failure.stage == "import" and "libfoo" in failure.error


class RaisingPlugin:
    @hookimpl
    def register_tasks(self, register):
        raise RuntimeError("bad hook")


class Echo(Task):
    name = "echo"
    summary = "Return the input"
    params = (Param("times", "int", default=1, min=1, max=3),)

    def run(self, request, context):
        return TaskResult([request.inputs["image"].to_pil()])


class EchoPlugin:
    @hookimpl
    def register_tasks(self, register):
        register(Echo)


def test_plugin_whose_hook_raises_is_reported_and_others_work() -> None:
    registry = build_registry([RaisingPlugin(), EchoPlugin()], entry_points=False)
    assert "echo" in registry.tasks and "superres" in registry.tasks
    [failure] = registry.failures
    assert failure.plugin == "RaisingPlugin" and "bad hook" in failure.error and "register_tasks" in failure.stage


def test_duplicate_task_name_is_refused_naming_both_plugins() -> None:
    class Again(Echo):
        name = "superres"

    class DupPlugin:
        @hookimpl
        def register_tasks(self, register):
            register(Again)

    registry = build_registry([DupPlugin()], entry_points=False)
    assert registry.tasks["superres"].value is not Again
    [failure] = registry.failures
    assert "already registered by plugin 'difftool.plugins.builtin.superres'" in failure.error


def test_parameter_clashing_with_a_common_option_is_refused() -> None:
    class Clash(Echo):
        name = "clash"
        params = (Param("seed", "int"),)

    class ClashPlugin:
        @hookimpl
        def register_tasks(self, register):
            register(Clash)

    registry = build_registry([ClashPlugin()], entry_points=False)
    assert "clash" not in registry.tasks
    assert "clashes with a common option" in registry.failures[0].error


def test_no_plugins_switch(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (site / "shout_plugin.py").write_text(SHOUT_PLUGIN)
    fake_distribution(site, "shout-plugin", {"shout": "shout_plugin"})
    monkeypatch.setenv("DIFFTOOL_NO_PLUGINS", "1")
    assert plugins_disabled()
    assert "shout" not in get_registry().tasks
    monkeypatch.setenv("DIFFTOOL_NO_PLUGINS", "0")
    assert not plugins_disabled()
    assert "shout" in get_registry().tasks


def test_commands_hook_adds_a_cli_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import click
    from click.testing import CliRunner

    from difftool import cli

    class CommandPlugin:
        @hookimpl
        def register_commands(self, cli):
            @cli.command()
            def hello():
                click.echo("hello from a plugin")

    from difftool.core.runtime import Runtime, using

    registry = build_registry([CommandPlugin()], entry_points=False)
    try:
        with using(Runtime()):  # a fresh process's state: the plugins' commands not added yet
            result = CliRunner().invoke(cli.cli, ["hello"], obj=registry)
        assert result.exit_code == 0 and "hello from a plugin" in result.output
    finally:
        cli.cli.commands.pop("hello", None)


def test_plugin_that_changes_global_state_is_reported_and_undone(site: Path) -> None:
    from PIL import Image, ImageFile

    limit = Image.MAX_IMAGE_PIXELS
    (site / "broken_plugin.py").write_text(
        "from PIL import Image\nImage.MAX_IMAGE_PIXELS = None  # 'fixes' large images for everyone\n"
    )
    fake_distribution(site, "broken-plugin", {"broken": "broken_plugin"})

    class Truncating:
        @hookimpl
        def register_tasks(self, register):
            ImageFile.LOAD_TRUNCATED_IMAGES = True

    registry = build_registry([Truncating()])
    assert Image.MAX_IMAGE_PIXELS == limit and ImageFile.LOAD_TRUNCATED_IMAGES is False
    changed = {(f.plugin, f.error.split(";")[0]) for f in registry.failures if f.stage == "global state"}
    assert changed == {
        ("broken", "changed PIL.Image.MAX_IMAGE_PIXELS"),
        ("Truncating", "changed PIL.ImageFile.LOAD_TRUNCATED_IMAGES"),
    }


def test_malformed_registrations_are_reported_and_the_rest_registered() -> None:
    from difftool.core.task import Task

    class Nameless(Task):
        summary = "no name"

        def run(self, request, context):
            return None

    class Malformed:
        @hookimpl
        def register_tasks(self, register):
            register("not a class")
            register(Nameless)

        @hookimpl
        def register_schedulers(self, register):
            register("broken", object())  # not callable: refused when used, named now

        @hookimpl
        def register_backends(self, register):
            register(42)

    registry = build_registry([Malformed()], entry_points=False)
    stages = {(f.plugin, f.error.split(":")[0]) for f in registry.failures}
    assert any("not a Task subclass" in f.error for f in registry.failures)
    assert any("not a Backend instance" in f.error for f in registry.failures)
    assert all(plugin == "Malformed" for plugin, _ in stages)
    assert "superres" in registry.tasks and "torch" in registry.backends  # the built-ins are unaffected


# --- the one model resolver ---------------------------------------------------------------------------


@pytest.fixture
def listed(tmp_path: Path) -> tuple:
    """A registry whose model sources list an upscaler ``4x-ink``, a LoRA ``ink`` and a checkpoint ``dreamy``."""
    from difftool.core.models import ModelEntry

    files = {name: tmp_path / f"{name}.safetensors" for name in ("4x-ink", "ink", "dreamy")}
    for path in files.values():
        path.write_bytes(b"\0")
    registry = build_registry(entry_points=False)
    entries = [
        ModelEntry("4x-ink", files["4x-ink"], "upscaler", "test"),
        ModelEntry("ink", files["ink"], "lora", "test"),
        ModelEntry("dreamy", files["dreamy"], "sd1", "test"),
    ]
    registry.find_models = lambda: entries  # type: ignore[method-assign]
    return registry, files


def test_resolve_model_finds_a_listed_name_among_its_families(listed: tuple) -> None:
    registry, files = listed
    assert registry.resolve_model("4x-ink", ("difftool-superres", "upscaler")) == files["4x-ink"]
    assert registry.resolve_model("ink", ("lora",)) == files["ink"]
    assert registry.resolve_model("dreamy") == files["dreamy"]  # no families: any listed model


def test_resolve_model_takes_an_existing_path_as_itself(listed: tuple, tmp_path: Path) -> None:
    registry, _ = listed
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"\0")
    assert registry.resolve_model(str(mine), ("upscaler",)) == mine  # a path is checked by the task, any family
    assert registry.resolve_model(str(tmp_path)) == tmp_path  # a folder too
    with pytest.raises(ModelError, match="not found"):  # a server resolves paths through its own policy
        registry.resolve_model(str(mine), ("upscaler",), paths=False)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ModelError, match="not a regular file or folder"):  # its open() would block forever
        registry.resolve_model(str(fifo))


def test_an_unknown_model_is_one_line_naming_the_fix_and_the_choices(listed: tuple) -> None:
    registry, _ = listed
    with pytest.raises(ModelError) as error:
        registry.resolve_model("4x-pen", ("difftool-superres", "upscaler"), what="--hires-upscaler")
    assert str(error.value).splitlines()[0].startswith("--hires-upscaler '4x-pen' not found (listed: 4x-ink)")
    assert "\n" not in error.value.problem and "listed name" in error.value.fix


def test_a_listed_model_of_another_family_is_refused(listed: tuple) -> None:
    registry, _ = listed
    with pytest.raises(ModelError, match=r"'ink' is a lora model, not sdxl-refiner \(listed: none found\)"):
        registry.resolve_model("ink", ("sdxl-refiner",))
    with pytest.raises(ModelError, match=r"'dreamy' is a sd1 model, not difftool-superres or upscaler"):
        registry.resolve_model("dreamy", ("difftool-superres", "upscaler"))
