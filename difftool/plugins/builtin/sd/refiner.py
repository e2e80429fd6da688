"""The SDXL refiner for ``generate``: ``--refiner MODEL [--refiner-switch 0.8]``.

The base model denoises to the switch point and hands its latents (not decoded) to the refiner, which
finishes them. This follows diffusers' ``StableDiffusionXLPipeline(denoising_end=s, output_type="latent")``
then ``StableDiffusionXLImg2ImgPipeline(denoising_start=s)`` exactly: one plan of ``--steps`` timesteps
(each model's own scheduler, same name) cut at the training timestep ``round((1 - s) * T)``; the refiner
reads the prompts with its own text encoder (OpenCLIP-G, pooled) and is conditioned on the aesthetic
scores 6 and 2.5 (see :func:`pipeline.encode_prompt`). Both halves run through the core sampler with a
:class:`SwitchScheduler`, and one run's generator goes on through both, as in diffusers with one generator.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from difftool.core.errors import ModelError, ParameterError
from difftool.core.params import Params
from difftool.core.scheduler import DiffusersScheduler, Scheduler, SchedulerStep
from difftool.core.task import Param, RunContext
from difftool.plugins.builtin.sd.loader import SDModel
from difftool.plugins.builtin.sd.models import cached_model, resolve_path

if TYPE_CHECKING:
    import torch

DEFAULT_SWITCH = 0.8  # A1111's and diffusers' examples' default
#: The family ``difftool models`` gives SDXL refiners: what ``--refiner`` may name.
REFINER_FAMILIES = ("sdxl-refiner",)
REFINER_PARAMS = (
    Param(
        "refiner",
        "model",
        default=None,
        families=REFINER_FAMILIES,
        help="an SDXL refiner that finishes the image (a file, folder or a name `difftool models` lists)",
    ),
    Param(
        "refiner_switch",
        "float",
        default=DEFAULT_SWITCH,
        min=0.01,
        max=0.99,
        help="the fraction of the denoising the base model does before the refiner takes over",
    ),
)


@dataclass
class Refiner:
    """A loaded refiner and where it takes over (a fraction of the denoising, diffusers' ``denoising_start``)."""

    model: SDModel
    switch: float

    def record(self) -> dict[str, Any]:
        """What the output metadata says (A1111's ``Refiner: name [hash]``, ``Refiner switch at``)."""
        return {"refiner": self.model.name, "refiner_hash": self.model.sha256[:10], "refiner_switch": self.switch}


def refiner_for(params: Params, base: SDModel, context: RunContext) -> Refiner | None:
    """The request's ``--refiner``, loaded and checked against the base model; ``None`` without one."""
    name = params.refiner
    if not name:
        return None
    if base.family.name != "sdxl":
        raise ModelError(
            f"--refiner finishes SDXL base models; {base.name} is {base.family.label}",
            "pass an SDXL base as --model, or drop --refiner",
        )
    model = cached_model(resolve_path(name, context), [], params, context, "-refiner")
    if not model.family.refiner:
        raise ModelError(
            f"--refiner {name} is {model.family.label}, not an SDXL refiner",
            "pass an SDXL refiner (`difftool models` lists them as sdxl-refiner), or drop --refiner",
        )
    return Refiner(model, params.refiner_switch)


def plan_shares(
    base: SDModel,
    refiner: Refiner,
    context: RunContext,
    params: Params,
    strength: float = 1.0,
    strength_flag: str = "--strength",
) -> tuple[SwitchScheduler, SwitchScheduler, list[int]]:
    """The base's and the refiner's schedulers for ``params`` and their step counts; a one-line error
    (naming ``strength_flag``) when either would run no step. Cheap: check it before any sampling."""
    name, steps = params.scheduler, params.steps
    first = SwitchScheduler(context.make_scheduler(name, base.scheduler_config), end=refiner.switch)
    second = SwitchScheduler(context.make_scheduler(name, refiner.model.scheduler_config), start=refiner.switch)
    return first, second, [first.planned(steps, strength, strength_flag), second.planned(steps)]


def sample_refined(
    run_sd: Callable[..., Any],
    base: SDModel,
    refiner: Refiner,
    context: RunContext,
    params: Params,
    controls: Sequence[Any] = (),
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    strength_flag: str = "--strength",
    **texts: Any,
) -> torch.Tensor:
    """The base to the switch point, then the refiner from its latents: final latents (decode with the
    refiner's VAE). ``run_sd``: :func:`tasks.run_sd`, the core sampler's caller; ``texts``: its ``prompt``,
    ``negative`` and ``size``; ``params["scheduler"]``: the scheduler of both halves. ``controls``
    (ControlNet units, made for the base) guide the base's share only, their start and end fractions of
    the whole plan, as in diffusers' ``StableDiffusionXLControlNetPipeline(denoising_end=s)``. ``init``
    and ``strength`` (the option ``strength_flag``): img2img for the base, as diffusers'
    ``StableDiffusionXLImg2ImgPipeline(strength=..., denoising_end=s)``; the refiner's share is the same."""
    first, second, counts = plan_shares(base, refiner, context, params, strength, strength_flag)
    total = sum(counts)
    with _progress_from(context, 0, total):
        latents = run_sd(
            base, context, params, scheduler=first, controls=controls, init=init, strength=strength, **texts
        )
    with _progress_from(context, counts[0], total):
        return run_sd(refiner.model, context, params, scheduler=second, init=latents, init_noised=True, **texts)


@contextlib.contextmanager
def _progress_from(context: RunContext, done: int, total: int) -> Iterator[None]:
    """Progress of one half reported as steps of both: ``done`` before it, ``total`` in all."""
    report = context.progress
    if report is not None:
        context.progress = lambda step, _total, preview=None: report(done + step, total, preview)
    try:
        yield
    finally:
        context.progress = report


class SwitchScheduler(Scheduler):
    """A diffusers scheduler's plan of ``num_steps`` cut at a fraction of the denoising.

    ``end``: the timesteps down to the switch (the base's share, diffusers' ``denoising_end``); ``start``:
    those after it (the refiner's, ``denoising_start``, one more for a second-order scheduler that would
    stop between its two evaluations). Stepping is the wrapped scheduler's. ``whole_plan``: the length
    of the plan the share is cut from (ControlNet's start and end are fractions of it).
    """

    def __init__(self, inner: Scheduler, *, start: float | None = None, end: float | None = None) -> None:
        if not isinstance(inner, DiffusersScheduler):
            raise ParameterError(
                f"the scheduler {type(inner).__name__} cannot be split between a base and a refiner",
                "pass a built-in --scheduler with --refiner",
            )
        if (start is None) == (end is None):
            raise ValueError("SwitchScheduler takes one of start and end")
        self.inner, self.start, self.end = inner, start, end
        self.prediction_type = inner.prediction_type

    @property
    def init_noise_sigma(self) -> float:
        return self.inner.init_noise_sigma

    def set_timesteps(self, num_steps: int, strength: float = 1.0) -> None:
        self.inner.set_timesteps(num_steps, strength)
        impl = self.inner.impl
        timesteps = self.inner.timesteps
        train = int(impl.config.num_train_timesteps)
        fraction = self.end if self.end is not None else self.start
        assert fraction is not None
        cutoff = int(round(train - fraction * train))
        if self.end is not None:
            timesteps = timesteps[: int((timesteps >= cutoff).sum())]
        else:
            count = int((timesteps < cutoff).sum())
            if impl.order == 2 and count % 2 == 0:
                count += 1
            begin = len(timesteps) - count
            timesteps = timesteps[begin:]
            if hasattr(impl, "set_begin_index"):
                impl.set_begin_index(begin)
        self.timesteps = timesteps
        self.whole_plan = len(self.inner.timesteps)

    def planned(self, num_steps: int, strength: float = 1.0, strength_flag: str = "--strength") -> int:
        """How many of ``num_steps`` this share runs; a one-line error when it would run none."""
        self.set_timesteps(num_steps, strength)
        if not len(self.timesteps):
            who, switch = ("base", self.end) if self.end is not None else ("refiner", self.start)
            if strength < 1.0 and self.end is not None and len(self.inner.timesteps):
                # img2img starts at the plan's first timestep; the base needs one at or above the cutoff.
                train, start = int(self.inner.impl.config.num_train_timesteps), int(self.inner.timesteps[0])
                need = math.ceil(round((train - start) / train * 100, 6)) / 100
                raise ParameterError(
                    f"--refiner-switch {switch:g} comes before {strength_flag} {strength:g} starts the pass "
                    f"(at {1 - start / train:.2f} of the denoising): the base would run no step",
                    f"raise --refiner-switch to {need:g} or more, or raise {strength_flag}",
                )
            raise ParameterError(
                f"--refiner-switch {switch:g} with {num_steps} steps leaves the {who} no step",
                "raise --steps or move --refiner-switch towards 0.5",
            )
        return len(self.timesteps)

    def scale_model_input(self, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner.scale_model_input(sample, t)

    def step(
        self, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor, generator: Any = None
    ) -> SchedulerStep:
        return self.inner.step(model_output, t, sample, generator=generator)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner.add_noise(original, noise, t)
