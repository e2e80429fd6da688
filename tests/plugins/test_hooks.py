"""Each registration hook, exercised end to end by a small plugin defined here."""

from pathlib import Path

import pytest
import torch

from difftool.app import api
from difftool.app.plan import validate_params
from difftool.core.backend import Backend
from difftool.core.denoiser import TorchDenoiser
from difftool.core.errors import BackendUnavailableError, ParameterError
from difftool.core.exporter import Exporter, ExportResult
from difftool.core.models import ModelEntry, ModelSource
from difftool.core.scheduler import Scheduler, SchedulerStep
from difftool.core.task import Param, Task, TaskRequest
from difftool.plugins import hookimpl
from difftool.plugins.registry import build_registry
from difftool.testing import SD_SCHEDULE, SchedulerConformance

#: The text lengths Stable Diffusion tasks declare for a short prompt (one TensorRT engine up to 3 chunks).
TEXT = (77, 77, 231)


class OneStepScheduler(Scheduler):
    """A scheduler written from scratch: jump straight to the predicted clean sample."""

    prediction_type = "sample"

    def __init__(self, config):
        self.config = dict(config)

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(self, num_steps, strength=1.0):
        kept = max(1, int(num_steps * strength)) if strength < 1 else num_steps
        self.timesteps = torch.linspace(999, 0, num_steps).round()[-kept:]

    def scale_model_input(self, sample, t):
        return sample

    def step(self, model_output, t, sample, generator=None):
        return SchedulerStep(prev_sample=model_output, pred_original_sample=model_output)

    def add_noise(self, original, noise, t):
        return original + noise * (t.float() / 1000).reshape(-1, 1, 1, 1)


class SchedulerPlugin:
    @hookimpl
    def register_schedulers(self, register):
        register("one-step", OneStepScheduler, label="One step", summary="test")


class TestOneStepScheduler(SchedulerConformance):
    def make_scheduler(self):
        return build_registry([SchedulerPlugin()], entry_points=False).make_scheduler("one-step", SD_SCHEDULE)


def test_a_plugin_scheduler_drives_a_builtin_task(photo: Path, superres_model: Path) -> None:
    registry = build_registry([SchedulerPlugin()], entry_points=False)
    assert registry.schedulers["one-step"].plugin == "SchedulerPlugin"
    result = api.run(
        "superres",
        photo,
        model=str(superres_model),
        scale="2",
        scheduler="one-step",
        seed=1,
        registry=registry,
        dtype="fp32",
    )
    assert result.image.size == (56, 40) and result.record["scheduler"] == "one-step"


class CountingBackend(Backend):
    name = "counting"
    summary = "torch, counting calls"
    calls = 0

    def make_denoiser(self, module, spec):
        inner = TorchDenoiser(module, prediction_type=spec.prediction_type, device=spec.device, dtype=spec.dtype)

        class Counting(TorchDenoiser):
            backend = "counting"

            def __call__(s, sample, t, cond):  # noqa: N805 - reads better beside inner
                CountingBackend.calls += 1
                return inner(sample, t, cond)

        wrapped = Counting.__new__(Counting)
        wrapped.__dict__.update(inner.__dict__)
        return wrapped


class MissingDriverBackend(Backend):
    name = "fancy"

    def unavailable_reason(self, device="cpu"):
        return "libfancy.so not found; install fancy-runtime"

    def make_denoiser(self, module, spec):
        raise AssertionError("never called")


class BackendPlugin:
    @hookimpl
    def register_backends(self, register):
        register(CountingBackend())
        register(MissingDriverBackend())


def test_a_plugin_backend_runs_a_task_unchanged(photo: Path, superres_model: Path) -> None:
    registry = build_registry([BackendPlugin()], entry_points=False)
    CountingBackend.calls = 0
    result = api.run(
        "superres",
        photo,
        model=str(superres_model),
        scale="2",
        steps=3,
        backend="counting",
        seed=1,
        registry=registry,
        dtype="fp32",
    )
    assert CountingBackend.calls == 3
    reference = api.run(
        "superres", photo, model=str(superres_model), scale="2", steps=3, seed=1, registry=registry, dtype="fp32"
    )
    assert result.image.tobytes() == reference.image.tobytes()


def test_unavailable_backend_fails_at_once_with_its_reason(photo: Path, superres_model: Path) -> None:
    registry = build_registry([BackendPlugin()], entry_points=False)
    with pytest.raises(BackendUnavailableError, match="libfancy.so not found"):
        api.run("superres", photo, model=str(superres_model), backend="fancy", registry=registry)


class ListedSource(ModelSource):
    name = "listed"

    def __init__(self, path: Path) -> None:
        self.path = path

    def find(self):
        return [ModelEntry("house-upscaler", self.path, "difftool-superres", "test")]


class BrokenSource(ModelSource):
    name = "broken"

    def find(self):
        raise OSError("network share unreachable")


def test_model_sources_list_and_resolve_names(photo: Path, superres_model: Path) -> None:
    class ModelPlugin:
        @hookimpl
        def register_models(self, register):
            register(ListedSource(superres_model))
            register(BrokenSource())

    registry = build_registry([ModelPlugin()], entry_points=False)
    names = [m.name for m in registry.find_models()]
    assert "house-upscaler" in names
    assert any(f.stage == "model source 'broken'" and "unreachable" in f.error for f in registry.failures)
    result = api.run("superres", photo, model="house-upscaler", scale="2", seed=0, registry=registry)
    assert result.record["model"] == "tiny-superres"


def test_folder_source_finds_models_and_checkpoints(tmp_path: Path, superres_model: Path, monkeypatch) -> None:
    import shutil

    root = tmp_path / "webui"
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    (root / "models" / "Stable-diffusion" / "dreamy.safetensors").write_bytes(b"\0" * 16)
    (root / "models" / "Lora").mkdir()
    (root / "models" / "Lora" / "old.ckpt").write_bytes(b"\0")
    shutil.copytree(superres_model, root / "mine")
    monkeypatch.setenv("DIFFTOOL_MODELS", str(root))
    found = {m.name: m.family for m in build_registry(entry_points=False).find_models()}
    assert found["mine"] == "difftool-superres"
    assert found["dreamy"].startswith("unreadable (dreamy.safetensors is invalid")
    assert found["old"].startswith("pickle")


class ShapeRecordingBackend(Backend):
    """A backend that builds shape-specific engines: it receives the task's declared export shapes."""

    name = "shapes"
    seen: list = []

    def make_denoiser(self, module, spec):
        from difftool.core.denoiser import TorchDenoiser

        ShapeRecordingBackend.seen.append(spec.shapes)
        return TorchDenoiser(module, prediction_type=spec.prediction_type, device=spec.device)


class ShapesPlugin:
    @hookimpl
    def register_backends(self, register):
        register(ShapeRecordingBackend())


def test_tasks_declare_the_shapes_a_shape_specific_backend_builds_for(photo: Path, superres_model: Path) -> None:
    from difftool.core.task import ExportShapes

    registry = build_registry([ShapesPlugin()], entry_points=False)
    ShapeRecordingBackend.seen = []
    api.run("superres", photo, model=str(superres_model), scale="2", tile=256, overlap=32, backend="shapes",
            seed=1, registry=registry, dtype="fp32")  # fmt: skip
    # any tile up to --tile, whatever the image: small inputs and edge tiles fit, one engine for a folder
    assert ShapeRecordingBackend.seen == [ExportShapes(batch=(1, 1, 1), size=(1, 256, 256))]
    task = registry.task("generate")

    def shapes(**params):  # the task reads validated parameters: every declared one, defaults applied
        return task.export_shapes(TaskRequest({}, validate_params(task, {"prompt": "a", **params}, registry)))

    generate = shapes(width=640, height=512, guidance_scale=7.0)
    assert generate == ExportShapes(batch=(1, 2, 2), size=(8, 80, 128), tokens=TEXT)
    tiny = shapes(width=16, height=16, guidance_scale=1.0)
    assert tiny == ExportShapes(batch=(1, 1, 1), size=(2, 2, 128), tokens=TEXT)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ExportShapes(size=(64, 32, 128))


def test_image_sized_tasks_declare_shapes_from_their_input(photo: Path, inpaint_model: Path, tmp_path: Path) -> None:
    """style and inpaint learn their size from the image: they declare it once they have it."""
    import sys

    from PIL import Image

    from difftool.core.task import ExportShapes

    sys.path.insert(0, str(Path(__file__).resolve().parent / "builtin"))
    from sd import tiny

    registry = build_registry([ShapesPlugin()], entry_points=False)
    ShapeRecordingBackend.seen = []
    width, height = Image.open(photo).size
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (2, 2, 10, 10))
    api.run("inpaint", photo, mask=mask, model=str(inpaint_model), backend="shapes", seed=1, registry=registry,
            dtype="fp32")  # fmt: skip
    assert ShapeRecordingBackend.seen == [ExportShapes(batch=(1, 1, 1), size=(1, 512, 1024))]

    folder = tiny.save_folder(tiny.components(seed=3), tmp_path / "sd")
    image = tmp_path / "in.png"
    Image.new("RGB", (72, 40), (120, 90, 60)).save(image)
    ShapeRecordingBackend.seen = []
    api.run("style", image, model=str(folder), prompt="ink", steps=2, strength=0.5, backend="shapes", seed=1,
            registry=registry, dtype="fp32")  # fmt: skip
    assert ShapeRecordingBackend.seen == [ExportShapes(batch=(1, 2, 2), size=(1, 64, 128), tokens=TEXT)]
    # A larger image in the same folder job: the same declaration, so the same engine.
    Image.new("RGB", (320, 200), (120, 90, 60)).save(image)
    ShapeRecordingBackend.seen = []
    api.run("style", image, model=str(folder), prompt="ink", steps=1, strength=1.0, backend="shapes", seed=1,
            registry=registry, dtype="fp32")  # fmt: skip
    assert ShapeRecordingBackend.seen == [ExportShapes(batch=(1, 2, 2), size=(1, 64, 128), tokens=TEXT)]


class GpuOnlyBackend(Backend):
    """Like TensorRT: refuses the CPU. A test double at the hardware boundary (it runs torch on the CPU)."""

    name = "gpuonly"
    devices: list = []

    def unavailable_reason(self, device: str = "cpu") -> str | None:
        return None if device.startswith("cuda") else "needs an NVIDIA GPU; pass --device cuda"

    def make_denoiser(self, module, spec):
        from difftool.core.denoiser import TorchDenoiser

        GpuOnlyBackend.devices.append(spec.device)
        return TorchDenoiser(module, prediction_type=spec.prediction_type, dtype=spec.dtype)


class GpuOnlyPlugin:
    @hookimpl
    def register_backends(self, register):
        register(GpuOnlyBackend())


def test_a_gpu_only_backend_is_not_looked_up_again_without_the_device(photo: Path, superres_model: Path) -> None:
    """Regression: RunContext.make_denoiser looked the backend up by name alone (device "cpu"), so a backend
    that refuses the CPU (TensorRT) was refused inside every task even with --device cuda."""
    registry = build_registry([GpuOnlyPlugin()], entry_points=False)
    GpuOnlyBackend.devices = []
    result = api.run("superres", photo, model=str(superres_model), scale="2", backend="gpuonly", device="cuda",
                     dtype="fp32", seed=1, registry=registry)  # fmt: skip
    assert GpuOnlyBackend.devices == ["cuda"] and result.record["backend"] == "gpuonly"


class CountExporter(Exporter):
    """A third-party exporter: writes the network's parameter count."""

    name = "count"
    summary = "the parameter count as text"
    options = (Param("output", "path", required=True, help="file to write"),)

    def export(self, target, task, options):
        count = sum(p.numel() for p in target.module.parameters())
        Path(options["output"]).write_text(f"{task} {count} {target.model_id[:8]}")
        return ExportResult(Path(options["output"]), [f"{count} parameters"])


class TextExporter:
    @hookimpl
    def register_exporters(self, register):
        register(CountExporter())


def test_a_plugin_exporter_exports_any_exportable_task(tmp_path: Path, superres_model: Path) -> None:
    from click.testing import CliRunner

    from difftool.plugins.builtin.exporters import exportable_tasks, exporter_command

    registry = build_registry([TextExporter()], entry_points=False)
    assert {"superres", "inpaint", "generate", "style"} <= set(exportable_tasks(registry))
    command = exporter_command(registry.exporters["count"].value, registry)
    out = tmp_path / "count.txt"
    result = CliRunner().invoke(command, ["superres", "--model", str(superres_model), "-o", str(out)])
    assert result.exit_code == 0, result.output
    task, count, _ = out.read_text().split()
    assert task == "superres" and int(count) > 0 and "parameters" in result.output
    refused = CliRunner().invoke(command, ["nosuchtask", "-o", str(out)])
    assert refused.exit_code == 1 and "unknown task 'nosuchtask'" in refused.output


class Wrong(Task):
    name = "wrong"
    summary = "declares a default outside its range"
    params = (Param("steps", "int", default=0, min=1, max=10),)

    def run(self, request, context):
        raise AssertionError("never runs")


class BadlyDeclared:
    @hookimpl
    def register_tasks(self, register):
        register(Wrong)


def test_a_wrongly_declared_task_is_refused_at_registration_naming_its_plugin() -> None:
    registry = build_registry([BadlyDeclared()], entry_points=False)
    assert "wrong" not in registry.tasks
    [failure] = [f for f in registry.failures if "wrong" in f.error]
    assert "BadlyDeclared" in failure.plugin and "default 0 is invalid" in failure.error
    from difftool.core.errors import PluginError

    with pytest.raises(PluginError, match="unknown task 'wrong'.*BadlyDeclared.*default 0 is invalid"):
        api.run("wrong", registry=registry)  # says which plugin failed, not only "unknown task"


def test_typed_choices_take_the_value_or_its_spelling(photo: Path, superres_model: Path) -> None:
    registry = build_registry(entry_points=False)
    for scale in (2, "2"):  # the API docs' int, and the CLI's/forms' text
        result = api.run("superres", photo, model=str(superres_model), scale=scale, seed=1, registry=registry)
        assert result.record["scale"] == 2 and result.image.size == (56, 40)
    with pytest.raises(ParameterError, match="--scale: unknown value 5"):
        api.run("superres", photo, model=str(superres_model), scale=5, registry=registry)


def test_preflight_refuses_controlnet_units_on_a_backend_without_controlnets(tmp_path: Path, photo: Path) -> None:
    """``Task.check_backend`` runs once at preflight: the model named here does not exist, so a refusal
    that came after loading it would be a model error, not this one."""
    from difftool.app.plan import preflight
    from difftool.core.errors import ParameterError

    registry = build_registry([ShapesPlugin()], entry_points=False)
    missing = str(tmp_path / "no-such-model.safetensors")
    from PIL import Image

    mask = {"mask": Image.new("L", (8, 8))}
    for task, inputs, extra in (("generate", [], {}), ("style", [photo], {}), ("inpaint", [photo], mask)):
        with pytest.raises(ParameterError, match="ControlNet does not run on --backend shapes") as caught:
            api.run(task, *inputs, model=missing, backend="shapes", prompt="x", control=[f"cn={photo}"],
                    registry=registry, **extra)  # fmt: skip
        assert "use --backend torch, onnx or tensorrt" in str(caught.value), task
    # Without units, or on a backend that runs ControlNets, the preflight passes (it resolves the files named,
    # it loads none of them).
    model, cn = tmp_path / "model.safetensors", tmp_path / "cn.safetensors"
    model.write_bytes(b"\0"), cn.write_bytes(b"\0")
    assert preflight("generate", model=str(model), backend="shapes", params={"prompt": "x"}, registry=registry)
    assert preflight("generate", model=str(model), params={"prompt": "x", "control": [str(cn)]}, registry=registry)
