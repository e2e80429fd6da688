"""The plugin's own tests: difftool's conformance suites plus a CLI run."""

from __future__ import annotations

import json

import difftool_plugin_example as plugin
import numpy as np
from click.testing import CliRunner
from PIL import Image

from difftool.plugins.registry import build_registry
from difftool.testing import SD_SCHEDULE, SchedulerConformance, TaskConformance


class TestPosterize(TaskConformance):
    def make_task(self):
        return plugin.Posterize()

    def make_params(self):
        return {"levels": 2}

    def registry(self):
        return build_registry([plugin], entry_points=False)


class TestDdimTrailing(SchedulerConformance):
    def make_scheduler(self):
        return build_registry([plugin], entry_points=False).make_scheduler("ddim-trailing", SD_SCHEDULE)


def test_posterize_two_levels_gives_black_or_white(tmp_path):
    from difftool.app import api

    gradient = Image.linear_gradient("L").convert("RGB")
    result = api.run("posterize", gradient, levels=2, registry=build_registry([plugin], entry_points=False))
    assert set(np.unique(np.asarray(result.image))) == {0, 255}


def test_cli_runs_the_task(tmp_path):
    from difftool import cli

    source = tmp_path / "in.png"
    Image.linear_gradient("L").save(source)
    out = tmp_path / "out.png"
    args = ["run", "posterize", str(source), "--levels", "3", "-o", str(out), "--json"]
    result = CliRunner().invoke(cli.cli, args, obj=build_registry([plugin], entry_points=False))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["status"] == "ok"
    assert len(np.unique(np.asarray(Image.open(out)))) == 3
