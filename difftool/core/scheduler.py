"""The Scheduler interface: which timesteps to visit and how to step between them.

A scheduler is created per run from the model's training noise schedule (a diffusers-style config
mapping: ``num_train_timesteps``, ``beta_schedule``, ``prediction_type``, ...) by a factory that a
plugin registers under a name (see ``register_schedulers`` in :mod:`difftool.plugins.hookspecs`).
:class:`DiffusersScheduler` adapts any diffusers scheduler; a plugin may implement
:class:`Scheduler` directly and prove it with :class:`difftool.testing.SchedulerConformance`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from difftool.core.errors import ParameterError

if TYPE_CHECKING:  # torch loads when a scheduler runs, so listing schedulers stays fast
    import torch

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


@dataclass
class SchedulerStep:
    """What one :meth:`Scheduler.step` returns."""

    prev_sample: torch.Tensor
    #: The model's current estimate of the clean sample, for previews; ``None`` if unknown.
    pred_original_sample: torch.Tensor | None = None


class Scheduler(ABC):
    """Timesteps plus a step rule. Stateful: create one per run, call :meth:`set_timesteps` first.

    The sampler calls, for each ``t`` in :attr:`timesteps`: ``scale_model_input`` -> model -> ``step``.
    """

    #: What the model predicts: ``epsilon`` (noise), ``v_prediction`` or ``sample`` (x0).
    prediction_type: str = "epsilon"
    #: Set by :meth:`set_timesteps`; decreasing noise levels, on the CPU.
    timesteps: torch.Tensor

    @property
    @abstractmethod
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise for a run that starts from pure noise."""

    @abstractmethod
    def set_timesteps(self, num_steps: int, strength: float = 1.0) -> None:
        """Plan ``num_steps`` steps; ``strength`` < 1 starts part-way (img2img) and keeps the last ones."""

    @abstractmethod
    def scale_model_input(self, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The sample as the model expects it at ``t`` (identity for most schedulers)."""

    @abstractmethod
    def step(
        self,
        model_output: torch.Tensor,
        t: torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SchedulerStep:
        """Advance ``sample`` from ``t`` to the next timestep given the model's output at ``t``."""

    @abstractmethod
    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise a clean ``original`` to level ``t`` (the start of an img2img run, inpaint blending)."""


def steps_for_strength(
    num_steps: int, strength: float, strength_flag: str = "--strength", steps_flag: str = "--steps"
) -> int:
    """How many of ``num_steps`` an img2img run at ``strength`` performs (diffusers' rule); the error names
    the options that set them (the hires pass: ``--hires-strength``, ``--hires-steps``)."""
    if not 0.0 < strength <= 1.0:
        raise ParameterError(f"{strength_flag} {strength} is outside (0, 1]", f"pass {strength_flag} such as 0.6")
    kept = min(int(num_steps * strength), num_steps)
    if kept < 1:
        raise ParameterError(
            f"{strength_flag} {strength} with {steps_flag} {num_steps} leaves no step to run",
            f"raise {strength_flag} or {steps_flag}",
        )
    return kept


class DiffusersScheduler(Scheduler):
    """Adapter over a diffusers ``SchedulerMixin`` instance.

    ``stochastic`` says whether its ``step`` takes a ``generator``; ``seed_attr`` names an attribute
    the scheduler seeds its own noise from (DPM++ SDE's Brownian tree), set from the run's generator.
    Declared by the registering spec rather than discovered by inspecting signatures.
    """

    def __init__(self, impl: Any, *, stochastic: bool = False, seed_attr: str | None = None) -> None:
        self.impl = impl
        self.stochastic = stochastic
        self.seed_attr = seed_attr
        self.prediction_type = impl.config.prediction_type
        self._seeded = False
        # Euler-family schedulers work in the "sigma" (variance exploding) parameterisation.
        self._variance_exploding = hasattr(impl, "sigmas") and float(impl.init_noise_sigma) > 1.0

    @property
    def init_noise_sigma(self) -> float:
        return float(self.impl.init_noise_sigma)

    def set_timesteps(self, num_steps: int, strength: float = 1.0) -> None:
        if num_steps < 1:
            raise ParameterError(f"steps must be at least 1, got {num_steps}", "pass --steps 1 or more")
        self.impl.set_timesteps(num_steps, device="cpu")
        timesteps = self.impl.timesteps
        if strength < 1.0:
            start = (num_steps - steps_for_strength(num_steps, strength)) * self.impl.order
            timesteps = timesteps[start:]
            if hasattr(self.impl, "set_begin_index"):
                self.impl.set_begin_index(start)
        self.timesteps = timesteps
        self._seeded = False
        self._variance_exploding = hasattr(self.impl, "sigmas") and float(self.impl.init_noise_sigma) > 1.0

    def scale_model_input(self, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.impl.scale_model_input(sample, t)

    def step(
        self,
        model_output: torch.Tensor,
        t: torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SchedulerStep:
        if self.seed_attr and not self._seeded and generator is not None:
            import torch

            setattr(self.impl, self.seed_attr, int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            self._seeded = True
        sigma = self._current_sigma()
        kwargs = {"generator": generator} if self.stochastic else {}
        out = self.impl.step(model_output, t, sample, return_dict=True, **kwargs)
        x0 = getattr(out, "pred_original_sample", None)
        if x0 is None:
            x0 = getattr(out, "denoised", None)
        if x0 is None:
            x0 = self._estimate_x0(model_output, t, sample, sigma)
        return SchedulerStep(prev_sample=out.prev_sample, pred_original_sample=x0)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.impl.add_noise(original, noise, t.reshape(1))

    # The clean-sample estimate for previews, for schedulers whose output does not carry one.
    def _current_sigma(self) -> torch.Tensor | None:
        index = getattr(self.impl, "step_index", None)
        if not self._variance_exploding or index is None:
            return None
        return self.impl.sigmas[index]

    def _estimate_x0(
        self, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor | None
    ) -> torch.Tensor | None:
        kind = self.prediction_type
        if kind == "sample":
            return model_output
        if self._variance_exploding:
            if sigma is None:
                return None
            sigma = sigma.to(sample.device, sample.dtype)
            if kind == "epsilon":
                return sample - sigma * model_output
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        alphas = getattr(self.impl, "alphas_cumprod", None)
        if alphas is None:
            return None
        a = alphas[int(t)].to(sample.device, sample.dtype)
        if kind == "epsilon":
            return (sample - (1 - a) ** 0.5 * model_output) / a**0.5
        return a**0.5 * sample - (1 - a) ** 0.5 * model_output


@dataclass(frozen=True)
class DiffusersSchedulerFactory:
    """Builds a :class:`DiffusersScheduler` of ``class_name`` from a model's noise-schedule config."""

    class_name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    stochastic: bool = False
    seed_attr: str | None = None

    def __call__(self, config: Mapping[str, Any]) -> DiffusersScheduler:
        cls = getattr(importlib.import_module("diffusers"), self.class_name)
        # from_config ignores keys this class does not take, so any model's schedule config fits.
        impl = cls.from_config({**dict(config), **self.overrides})
        return DiffusersScheduler(impl, stochastic=self.stochastic, seed_attr=self.seed_attr)
