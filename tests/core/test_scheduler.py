import importlib

import pytest
import torch

from difftool.core.errors import ParameterError
from difftool.core.scheduler import steps_for_strength
from difftool.plugins.builtin.schedulers import BUILTIN_SCHEDULERS
from difftool.testing import SD_SCHEDULE, SchedulerConformance

NAMES = sorted(BUILTIN_SCHEDULERS)


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * x + torch.sin(torch.as_tensor(t, dtype=x.dtype) / 100.0)


def reference_loop(name: str, steps: int, seed: int) -> torch.Tensor:
    """The loop as diffusers' own pipelines write it, on the raw diffusers scheduler."""
    factory = BUILTIN_SCHEDULERS[name][1]
    cls = getattr(importlib.import_module("diffusers"), factory.class_name)
    scheduler = cls.from_config({**SD_SCHEDULE, **factory.overrides})
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps, device="cpu")
    x = torch.randn(1, 4, 8, 8, generator=g) * scheduler.init_noise_sigma
    if factory.seed_attr:  # the adapter seeds the SDE's Brownian tree from the generator's next draw
        setattr(scheduler, factory.seed_attr, int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    for t in scheduler.timesteps:
        out = fake_model(scheduler.scale_model_input(x, t), t)
        kwargs = {"generator": g} if factory.stochastic else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def adapter_loop(name: str, steps: int, seed: int) -> torch.Tensor:
    scheduler = BUILTIN_SCHEDULERS[name][1](SD_SCHEDULE)
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(1, 4, 8, 8, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = fake_model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("name", NAMES)
def test_adapter_matches_the_diffusers_scheduler(name: str) -> None:
    expected = reference_loop(name, steps=5, seed=11)
    actual = adapter_loop(name, steps=5, seed=11)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_the_required_schedulers_are_built_in() -> None:
    required = {"ddpm", "ddim", "euler", "euler-a", "heun", "dpmpp-2m", "dpmpp-2m-karras", "dpmpp-sde", "unipc", "lcm"}
    assert required <= set(NAMES)


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m", "euler", "heun", "unipc"])
def test_preview_estimate_recovers_the_clean_sample(name: str) -> None:
    """With a model that returns the true noise, the predicted clean sample is the clean sample."""
    scheduler = BUILTIN_SCHEDULERS[name][1](SD_SCHEDULE)
    scheduler.set_timesteps(4)
    x0 = torch.rand(1, 3, 4, 4) * 2 - 1
    noise = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = scheduler.timesteps[0]
    x = scheduler.add_noise(x0, noise, t)
    scheduler.scale_model_input(x, t)
    step = scheduler.step(noise, t, x)
    assert step.pred_original_sample is not None
    torch.testing.assert_close(step.pred_original_sample, x0, atol=2e-3, rtol=1e-3)


def test_strength_rule() -> None:
    assert steps_for_strength(10, 0.5) == 5
    assert steps_for_strength(10, 1.0) == 10
    with pytest.raises(ParameterError, match="no step"):
        steps_for_strength(10, 0.05)
    with pytest.raises(ParameterError, match="outside"):
        steps_for_strength(10, 1.5)


@pytest.mark.parametrize("name", NAMES)
class TestBuiltinConformance(SchedulerConformance):
    @pytest.fixture(autouse=True)
    def _name(self, name: str) -> None:
        self.name = name

    def make_scheduler(self):
        return BUILTIN_SCHEDULERS[self.name][1](SD_SCHEDULE)
