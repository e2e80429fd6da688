"""Conformance suites for plugin authors: subclass one in a pytest module to prove an implementation fits.

::

    from difftool.testing import SchedulerConformance

    class TestMyScheduler(SchedulerConformance):
        def make_scheduler(self):
            return MyScheduler.from_config(SCHEDULE)

Each suite needs only pytest and the implementation; difftool's own built-ins run the same suites.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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

    def registry(self) -> Any:
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
        from difftool.api import prepare
        from difftool.core.task import CancelToken, RunContext

        task, registry = self.make_task(), self.registry()
        request = prepare(task, self.make_inputs(), self.make_params(), registry)
        context = RunContext(seed=1, registry=registry, cancel=cancel or CancelToken())
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
