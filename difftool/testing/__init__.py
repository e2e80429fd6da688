"""Conformance suites for plugin authors: subclass one in a pytest module to prove an implementation fits.

::

    from difftool.testing import SchedulerConformance

    class TestMyScheduler(SchedulerConformance):
        def make_scheduler(self):
            return MyScheduler.from_config(SCHEDULE)

Each suite needs only pytest and the implementation; difftool's own built-ins run the same suites.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from difftool.plugins.registry import Registry

#: The noise schedule the suites use (Stable Diffusion's).
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


class SchedulerConformance:
    """Checks the :class:`~difftool.core.scheduler.Scheduler` contract."""

    steps = 6

    def make_scheduler(self) -> Any:
        raise NotImplementedError

    @staticmethod
    def fake_model(x: Any, t: Any) -> Any:
        import torch

        return 0.5 * x + torch.sin(torch.as_tensor(t, dtype=x.dtype) / 100.0)

    def run_loop(self, scheduler: Any, seed: int = 0, strength: float = 1.0) -> Any:
        import torch

        g = torch.Generator().manual_seed(seed)
        scheduler.set_timesteps(self.steps, strength=strength)
        x = torch.randn(1, 3, 8, 8, generator=g) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = self.fake_model(scheduler.scale_model_input(x, t), t)
            step = scheduler.step(out, t, x, generator=g)
            assert step.prev_sample.shape == x.shape
            x = step.prev_sample
        return x

    def test_timesteps_decrease(self) -> None:
        scheduler = self.make_scheduler()
        scheduler.set_timesteps(self.steps)
        ts = np.asarray(scheduler.timesteps, dtype=np.float64)
        assert len(ts) >= self.steps
        assert ts[0] >= ts[-1]

    def test_strength_keeps_the_last_steps(self) -> None:
        full, part = self.make_scheduler(), self.make_scheduler()
        full.set_timesteps(self.steps)
        part.set_timesteps(self.steps, strength=0.5)
        assert 0 < len(part.timesteps) < len(full.timesteps)
        assert np.allclose(np.asarray(part.timesteps), np.asarray(full.timesteps)[-len(part.timesteps) :])

    def test_same_seed_same_result(self) -> None:
        import torch

        a = self.run_loop(self.make_scheduler(), seed=3)
        b = self.run_loop(self.make_scheduler(), seed=3)
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)

    def test_add_noise_keeps_shape(self) -> None:
        import torch

        scheduler = self.make_scheduler()
        scheduler.set_timesteps(self.steps)
        x0 = torch.zeros(1, 3, 8, 8)
        noisy = scheduler.add_noise(x0, torch.ones_like(x0), scheduler.timesteps[:1])
        assert noisy.shape == x0.shape and torch.isfinite(noisy).all()


class DenoiserConformance:
    """Checks the :class:`~difftool.core.denoiser.Denoiser` contract (shape, dtype, batch independence)."""

    def make_denoiser(self) -> Any:
        raise NotImplementedError

    def make_conditioning(self, batch: int) -> dict[str, Any]:
        return {}

    size = 16
    atol = 1e-4

    def test_output_shape_and_dtype(self) -> None:
        import torch

        d = self.make_denoiser()
        x = torch.randn(2, d.sample_channels, self.size, self.size)
        out = d(x, torch.tensor(500), self.make_conditioning(2))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert d.prediction_type in ("epsilon", "v_prediction", "sample")
        assert isinstance(d.backend, str) and d.backend

    def test_batch_items_are_independent(self) -> None:
        import torch

        d = self.make_denoiser()
        x = torch.randn(2, d.sample_channels, self.size, self.size, generator=torch.Generator().manual_seed(0))
        both = d(x, torch.tensor(300), self.make_conditioning(2))
        first = d(x[:1], torch.tensor(300), self.make_conditioning(1))
        assert torch.allclose(both[:1], first, atol=self.atol)


class TaskConformance:
    """Checks a :class:`~difftool.core.task.Task`: its declaration, a run, and cancellation."""

    def make_task(self) -> Any:
        raise NotImplementedError

    def make_inputs(self) -> list[Any]:
        from PIL import Image

        return [Image.new("RGB", (24, 16), (120, 60, 30))]

    def make_params(self) -> dict[str, Any]:
        return {}

    def registry(self) -> Registry:
        from difftool.plugins.registry import build_registry

        return build_registry(entry_points=False)

    def test_declaration(self) -> None:
        from difftool.core.task import Task

        task = self.make_task()
        assert isinstance(task, Task)
        assert task.name and task.summary and task.outputs
        for p in task.params:
            assert p.validate(p.default) == p.default or p.default is None or p.type in ("image", "mask", "path")

    def run_task(self, cancel: Any = None) -> Any:
        from difftool.app.api import prepare
        from difftool.app.plan import validate_params
        from difftool.core.task import CancelToken, RunContext

        task, registry = self.make_task(), self.registry()
        request = prepare(task, self.make_inputs(), validate_params(task, self.make_params(), registry))
        backend = registry.backend("torch").resolve("cpu", "fp32")
        context = RunContext(seed=1, backend=backend, registry=registry, cancel=cancel or CancelToken())
        return task.run(request, context)

    def test_run_produces_declared_outputs(self) -> None:
        result = self.run_task()
        assert len(result.images) == len(self.make_task().outputs)
        assert all(image.width > 0 and image.height > 0 for image in result.images)

    def test_cancelled_run_raises(self) -> None:
        import pytest

        from difftool.core.errors import Cancelled
        from difftool.core.task import CancelToken

        token = CancelToken()
        token.cancel()
        with pytest.raises(Cancelled):
            self.run_task(cancel=token)


def tiny_unet(seed: int = 0) -> Any:
    """A small random diffusers ``UNet2DModel`` (6 channels in: 3 noisy + 3 conditioning; 3 out)."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        in_channels=6,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


class _Counted:
    """A denoiser that forwards to ``denoiser`` through ``call`` (which counts) with the same attributes."""

    def __init__(self, denoiser: Any, call: Any) -> None:
        self._denoiser, self._call = denoiser, call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._denoiser, name)

    def __call__(self, x: Any, t: Any, cond: Any) -> Any:
        return self._call(x, t, cond)


class BackendConformance:
    """Checks a :class:`~difftool.core.backend.Backend` end to end on :func:`tiny_unet`: parity with PyTorch,
    a clear error for a wrong shape, a sampling loop that stops within a step of a cancel, and the cached
    artifact reused by the next denoiser instead of rebuilt.

    Subclasses give :meth:`make_backend` and may set ``device``, ``dtype`` and ``tolerance``, and
    override :meth:`environment` (a context manager the checks run in: :func:`difftool.testing.gpu.gpu_harness`
    for GPU backends on a CPU-only machine). The checks take pytest's ``tmp_path`` and ``monkeypatch``
    and point ``DIFFTOOL_CACHE`` at the first check's ``tmp_path``, shared by the class's checks.
    """

    device = "cpu"
    dtype = "fp32"
    tolerance = 1e-3
    options: dict[str, Any] = {}

    def make_backend(self) -> Any:
        raise NotImplementedError

    def environment(self) -> Any:
        import contextlib

        return contextlib.nullcontext()

    #: One artifact cache per suite class: every check exports the same tiny module, once.
    _artifacts: Any = None

    def _use_cache(self, tmp_path: Any, monkeypatch: Any) -> Any:
        if type(self)._artifacts is None:
            type(self)._artifacts = tmp_path
        monkeypatch.setenv("DIFFTOOL_CACHE", str(type(self)._artifacts))
        return type(self)._artifacts

    def _denoiser(self, module: Any, model_id: str = "conformance") -> Any:
        from difftool.core.params import ExportShapes

        resolved = self.make_backend().resolve(self.device, self.dtype, self.options)
        shapes = ExportShapes(batch=(1, 1, 1), size=(16, 16, 32))  # what a task would declare for 16 px
        return resolved.make_denoiser(module, prediction_type="epsilon", model_id=model_id, shapes=shapes)

    @staticmethod
    def _inputs(seed: int = 0, size: int = 16) -> tuple[Any, Any, dict[str, Any]]:
        import torch

        g = torch.Generator().manual_seed(seed)
        return (
            torch.randn(1, 3, size, size, generator=g),
            torch.tensor(400.0),
            {"concat": torch.randn(1, 3, size, size, generator=g)},
        )

    def test_matches_pytorch(self, tmp_path: Any, monkeypatch: Any) -> None:
        from difftool.core.denoiser import TorchDenoiser

        self._use_cache(tmp_path, monkeypatch)
        module = tiny_unet()
        x, t, cond = self._inputs()
        with self.environment():
            out = self._denoiser(module)(x, t, cond)
        expected = TorchDenoiser(module, prediction_type="epsilon")(x, t, cond)
        assert out.shape == expected.shape and out.dtype == x.dtype
        error = float((out.float().cpu() - expected).abs().max() / expected.abs().max())
        assert error < self.tolerance, error

    def test_a_wrong_shape_is_a_clear_error(self, tmp_path: Any, monkeypatch: Any) -> None:
        import pytest
        import torch

        from difftool.core.errors import DifftoolError

        self._use_cache(tmp_path, monkeypatch)
        x, t, _ = self._inputs()
        with self.environment():
            denoiser = self._denoiser(tiny_unet())
            with pytest.raises(DifftoolError, match="channels"):
                denoiser(x, t, {"concat": torch.zeros(1, 1, 16, 16)})  # 4 channels, not 6

    def test_sampling_stops_within_a_step_of_cancel(self, tmp_path: Any, monkeypatch: Any) -> None:
        import pytest

        from difftool.core.errors import Cancelled
        from difftool.core.sampler import sample
        from difftool.core.scheduler import DiffusersSchedulerFactory
        from difftool.core.task import CancelToken, RunContext
        from difftool.plugins.registry import Registry

        self._use_cache(tmp_path, monkeypatch)
        token, calls = CancelToken(), []
        _, _, cond = self._inputs()
        with self.environment():
            denoiser = self._denoiser(tiny_unet())
            original = denoiser.__call__

            def counted(x: Any, t: Any, c: Any) -> Any:
                calls.append(t)
                token.cancel()  # the user presses cancel during the first step
                return original(x, t, c)

            scheduler = DiffusersSchedulerFactory("DDIMScheduler")(SD_SCHEDULE)
            with pytest.raises(Cancelled):
                sample(
                    _Counted(denoiser, counted), scheduler, steps=5, shape=(1, 3, 16, 16), cond=cond,
                    context=RunContext(cancel=token, registry=Registry()),
                )  # fmt: skip
        assert len(calls) == 1

    def test_the_cached_artifact_is_reused(self, tmp_path: Any, monkeypatch: Any) -> None:
        cache = self._use_cache(tmp_path, monkeypatch)
        module = tiny_unet()
        with self.environment():
            first = self._denoiser(module)
            built = sorted(p for p in cache.rglob("manifest.json"))
            second = self._denoiser(module)
        assert sorted(p for p in cache.rglob("manifest.json")) == built  # nothing rebuilt
        assert getattr(first, "fingerprint", None) == getattr(second, "fingerprint", None)
