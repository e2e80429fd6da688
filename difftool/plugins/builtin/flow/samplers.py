"""The flow variants of the samplers users pick (DPM++ 2M, UniPC, Euler with Karras or beta sigmas), for SD3
and Flux: diffusers' own schedulers in their flow-matching configuration, planned as diffusers'
StableDiffusion3Pipeline and FluxPipeline plan them, so a seed gives diffusers' image with that scheduler.

How each is configured from the model's ``FlowMatchEulerDiscreteScheduler`` config (diffusers' documented
flow settings; nothing is re-implemented here):

- ``flow-dpmpp-2m``: ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M) with ``use_flow_sigmas``,
  ``prediction_type="flow_prediction"`` and ``flow_shift`` = the model's ``shift``; Flux dev's dynamic shift
  sets ``flow_shift = exp(mu)`` through ``set_timesteps(mu=...)``.
- ``flow-unipc``: ``UniPCMultistepScheduler`` configured the same way.
- ``flow-euler-karras`` / ``flow-euler-beta``: ``FlowMatchEulerDiscreteScheduler`` with ``use_karras_sigmas`` /
  ``use_beta_sigmas`` (the shifted sigmas respaced; beta needs scipy).

``shift`` (the ``--shift`` option) and :func:`effective_shift` (the one a run used, for its metadata) live here
too: a given shift replaces the model's (and Flux dev's resolution-dependent one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from difftool.core.errors import ParameterError
from difftool.plugins.builtin.flow.scheduler import FLOW_PREDICTION, FlowSampler, calculate_shift, is_flow_config

if TYPE_CHECKING:
    pass

#: The multistep solvers' flow configuration on top of the model's schedule config.
_FLOW_SOLVER = {"use_flow_sigmas": True, "prediction_type": FLOW_PREDICTION}


@dataclass(frozen=True)
class FlowSamplerFactory:
    """Builds a :class:`FlowSampler` of diffusers' ``class_name`` from a flow model's schedule config."""

    name: str
    class_name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    #: The solvers read the model's ``shift`` as ``flow_shift``.
    flow_shift: bool = False

    def __call__(self, config: Mapping[str, Any]) -> FlowSampler:
        import importlib

        if not is_flow_config(config):
            raise ParameterError(
                f"the {self.name} scheduler runs flow-matching models (SD3, Flux) only",
                "pick another --scheduler for this model",
            )
        config = flow_config = dict(config)
        seq_len = int(config.pop("image_seq_len", 4096))
        flux_sigmas = bool(config.pop("flux_sigmas", False))
        extra = {"flow_shift": float(config.get("shift", 1.0))} if self.flow_shift else {}
        cls = getattr(importlib.import_module("diffusers"), self.class_name)
        # Named as the config's class, FlowMatch Euler's own keys (shift, base_shift, ...) are dropped quietly.
        config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **config, **extra, **self.overrides}
        return FlowSampler(cls.from_config(config), seq_len, flux_sigmas, flow_config)


#: name -> (label, factory, summary). Labels end in "(flow)": A1111's sampler names stay the SD samplers'.
FLOW_SAMPLERS: dict[str, tuple[str, FlowSamplerFactory, str]] = {
    "flow-dpmpp-2m": (
        "DPM++ 2M (flow)",
        FlowSamplerFactory("flow-dpmpp-2m", "DPMSolverMultistepScheduler", _FLOW_SOLVER, flow_shift=True),
        "DPM-Solver++ 2M on flow sigmas with shift (SD3, Flux only)",
    ),
    "flow-unipc": (
        "UniPC (flow)",
        FlowSamplerFactory("flow-unipc", "UniPCMultistepScheduler", _FLOW_SOLVER, flow_shift=True),
        "UniPC multistep on flow sigmas with shift (SD3, Flux only)",
    ),
    "flow-euler-karras": (
        "Euler Karras (flow)",
        FlowSamplerFactory("flow-euler-karras", "FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}),
        "flow-matching Euler, shifted sigmas respaced as Karras' (SD3, Flux only)",
    ),
    "flow-euler-beta": (
        "Euler Beta (flow)",
        FlowSamplerFactory("flow-euler-beta", "FlowMatchEulerDiscreteScheduler", {"use_beta_sigmas": True}),
        "flow-matching Euler, shifted sigmas respaced by a beta distribution (SD3, Flux only)",
    ),
}


def with_shift(config: Mapping[str, Any], shift: float | None) -> dict[str, Any]:
    """The model's schedule config with ``--shift`` in place of its shift (and of Flux dev's dynamic one)."""
    if shift is None:
        return dict(config)
    if not shift > 0:
        raise ParameterError(f"--shift {shift} must be above 0", "pass --shift such as 3.0, or leave it out")
    return {**config, "shift": float(shift), "use_dynamic_shifting": False}


def effective_shift(config: Mapping[str, Any], seq_len: int) -> float:
    """The shift a run's sigmas were shifted by: the config's, or Flux dev's ``exp(mu)`` at ``seq_len`` tokens
    (the same sigmas as a fixed shift of that value, so the metadata's ``Shift`` reproduces the run)."""
    if config.get("use_dynamic_shifting"):
        return round(math.exp(calculate_shift(seq_len, config)), 4)
    return float(config.get("shift", 1.0))


def check_flow_params(params: Mapping[str, Any], arch: str, label: str) -> None:
    """``--true-cfg`` is Flux's: SD3 runs real CFG at ``--guidance-scale`` already."""
    if arch != "flux" and params["true_cfg"] is not None:
        raise ParameterError(f"--true-cfg is for Flux; {label} runs CFG at --guidance-scale", "drop --true-cfg")


def shift_record(model: Any, shift: float | None, size: tuple[int, int]) -> dict[str, float]:
    """The run's ``shift`` for its metadata (A1111 / Forge's ``Shift``)."""
    h, w = size[1] // model.vae_scale, size[0] // model.vae_scale
    return {"shift": effective_shift(with_shift(model.scheduler_config, shift), (h // 2) * (w // 2))}
