"""Flow-matching Euler behind the core Scheduler interface: SD3's fixed shift and Flux's resolution-dependent
(dynamic) shift, planned exactly as diffusers' StableDiffusion3Pipeline and FluxPipeline plan them.

The model's schedule config (diffusers' ``FlowMatchEulerDiscreteScheduler`` keys) carries two more keys
that the pipeline adds: ``image_seq_len`` (latent tokens, for the dynamic shift's ``mu``) and
``flux_sigmas`` (Flux pipelines plan ``linspace(1, 1/steps, steps)`` before shifting; SD3 the
scheduler's own timesteps).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from difftool.core.errors import ParameterError
from difftool.core.scheduler import Scheduler, SchedulerStep

if TYPE_CHECKING:
    import torch

NAME = "flow-euler"
FLOW_PREDICTION = "flow_prediction"
#: ``--scheduler`` names of Stable Diffusion samplers that have a flow variant (:mod:`.samplers`): an SD3 / Flux
#: run takes them as that variant (A1111 and Forge name the samplers alike for every model).
FLOW_VARIANTS = {"euler": NAME, "dpmpp-2m": "flow-dpmpp-2m", "unipc": "flow-unipc"}


def calculate_shift(seq_len: int, config: Mapping[str, Any]) -> float:
    """Flux's ``mu``: linear in the latent token count between the base and max shifts."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * slope + base_shift - slope * base_len


def is_flow_config(config: Mapping[str, Any]) -> bool:
    return config.get("_class_name") == "FlowMatchEulerDiscreteScheduler" or "shift" in config


class FlowSampler(Scheduler):
    """A diffusers flow-matching scheduler behind the core interface; sigmas from 1 (noise) to 0."""

    prediction_type = FLOW_PREDICTION

    def __init__(self, impl: Any, seq_len: int, flux_sigmas: bool, flow_config: Mapping[str, Any]) -> None:
        self.impl, self.seq_len, self.flux_sigmas, self.flow_config = impl, seq_len, flux_sigmas, dict(flow_config)

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(self, num_steps: int, strength: float = 1.0) -> None:
        import numpy as np

        if num_steps < 1:
            raise ParameterError(f"steps must be at least 1, got {num_steps}", "pass --steps 1 or more")
        config = self.impl.config
        kwargs: dict[str, Any] = {}
        if config.get("use_dynamic_shifting"):  # mu from the model's own config (the solvers drop its keys)
            kwargs["mu"] = calculate_shift(self.seq_len, self.flow_config)
        # FluxPipeline plans linspace(1, 1/n, n) before shifting, except for schedulers with their own flow sigmas.
        if self.flux_sigmas and not config.get("use_flow_sigmas"):
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        self.impl.set_timesteps(num_steps, device="cpu", **kwargs)
        timesteps = self.impl.timesteps
        if strength < 1.0:
            if strength <= 0.0:
                raise ParameterError(f"--strength {strength} is outside (0, 1]", "pass --strength such as 0.6")
            # The flow img2img pipelines' rule: int(n - n * strength) steps skipped (x the solver's order).
            start = int(max(num_steps - num_steps * strength, 0)) * self.impl.order
            timesteps = timesteps[start:]
            self.impl.set_begin_index(start)
        self.timesteps = timesteps

    def scale_model_input(self, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        t: torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SchedulerStep:
        if self.impl.step_index is None:
            self.impl._init_step_index(t)
        sigma = self.impl.sigmas[self.impl.step_index].to(sample.device)
        out = self.impl.step(model_output, t, sample, return_dict=True)
        # x_t = (1 - sigma) x0 + sigma noise and v = noise - x0, so x0 = x_t - sigma v.
        return SchedulerStep(prev_sample=out.prev_sample, pred_original_sample=sample - sigma * model_output)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # (1 - sigma) x0 + sigma noise in each: FlowMatch Euler calls it scale_noise, the solvers add_noise.
        if hasattr(self.impl, "scale_noise"):
            return self.impl.scale_noise(original, t.reshape(1), noise)
        return self.impl.add_noise(original, noise, t.reshape(1))


class FlowMatchEuler(FlowSampler):
    """Euler steps on the velocity a flow-matching model predicts (diffusers' FlowMatchEulerDiscreteScheduler)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = dict(config)
        seq_len = int(config.pop("image_seq_len", 4096))
        flux_sigmas = bool(config.pop("flux_sigmas", False))
        impl = FlowMatchEulerDiscreteScheduler.from_config(config)
        super().__init__(impl, seq_len, flux_sigmas, impl.config)


def flow_euler(config: Mapping[str, Any]) -> FlowMatchEuler:
    if not is_flow_config(config):
        raise ParameterError(
            f"the {NAME} scheduler runs flow-matching models (SD3, Flux) only",
            "pick another --scheduler for this model",
        )
    return FlowMatchEuler(config)


def run_scheduler(name: str | None, label: str) -> str:
    """The scheduler an SD3 / Flux run uses for ``--scheduler name``: a flow-matching one (``flow-euler``, or a
    plugin's ``flow-*``) as named; the SD tasks' declared default (filled in before the run) means "the
    family's own", ``flow-euler``; an SD sampler with a flow variant (``dpmpp-2m``) means that variant; any
    other Stable Diffusion sampler is refused in one line."""
    from difftool.plugins.builtin.sd.tasks import DEFAULT_SCHEDULER

    if not name or name == DEFAULT_SCHEDULER:
        return NAME
    if name in FLOW_VARIANTS:
        return FLOW_VARIANTS[name]
    if name == NAME or name.startswith("flow-"):
        return name
    raise ParameterError(
        f"--scheduler {name} is a Stable Diffusion sampler; {label} models run flow-matching schedulers",
        f"pass --scheduler {NAME} (or another flow-*: `difftool schedulers`), or leave --scheduler out",
    )
