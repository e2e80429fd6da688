"""The built-in schedulers: diffusers' schedulers under short names, with A1111's labels."""

from __future__ import annotations

from collections.abc import Callable

from difftool.core.scheduler import DiffusersSchedulerFactory
from difftool.plugins.hookspecs import hookimpl

#: name -> (A1111 label, factory, summary)
BUILTIN_SCHEDULERS: dict[str, tuple[str, DiffusersSchedulerFactory, str]] = {
    "ddpm": ("DDPM", DiffusersSchedulerFactory("DDPMScheduler", stochastic=True), "ancestral DDPM; needs many steps"),
    "ddim": ("DDIM", DiffusersSchedulerFactory("DDIMScheduler"), "deterministic DDIM"),
    "euler": ("Euler", DiffusersSchedulerFactory("EulerDiscreteScheduler", stochastic=True), "Euler, deterministic"),
    "euler-a": (
        "Euler a",
        DiffusersSchedulerFactory("EulerAncestralDiscreteScheduler", stochastic=True),
        "Euler ancestral; varies with the seed at every step",
    ),
    "heun": ("Heun", DiffusersSchedulerFactory("HeunDiscreteScheduler"), "second order; two model calls a step"),
    "dpmpp-2m": ("DPM++ 2M", DiffusersSchedulerFactory("DPMSolverMultistepScheduler"), "DPM-Solver++ 2M"),
    "dpmpp-2m-karras": (
        "DPM++ 2M Karras",
        DiffusersSchedulerFactory("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        "DPM-Solver++ 2M with Karras sigmas; good in 20-30 steps",
    ),
    "dpmpp-sde": (
        "DPM++ SDE",
        DiffusersSchedulerFactory("DPMSolverSDEScheduler", seed_attr="noise_sampler_seed"),
        "DPM-Solver++ SDE (Brownian tree noise seeded from the run's seed)",
    ),
    "unipc": ("UniPC", DiffusersSchedulerFactory("UniPCMultistepScheduler"), "UniPC multistep; good in few steps"),
    "lcm": ("LCM", DiffusersSchedulerFactory("LCMScheduler", stochastic=True), "for latent-consistency models"),
}


@hookimpl
def register_schedulers(register: Callable[..., None]) -> None:
    for name, (label, factory, summary) in BUILTIN_SCHEDULERS.items():
        register(name, factory, label=label, summary=summary)
