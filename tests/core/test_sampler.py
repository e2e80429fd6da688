import pytest
import torch

from difftool.core.denoiser import Denoiser
from difftool.core.errors import Cancelled
from difftool.core.sampler import sample
from difftool.core.task import CancelToken, RunContext
from difftool.plugins.builtin.schedulers import BUILTIN_SCHEDULERS
from difftool.plugins.registry import Registry
from difftool.testing import SD_SCHEDULE


class CountingDenoiser(Denoiser):
    """Predicts noise from the sample and the concat/context conditioning; records every call."""

    backend = "test"
    prediction_type = "epsilon"
    dtype = torch.float32
    device = torch.device("cpu")
    sample_channels = in_channels = 2

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict]] = []

    def __call__(self, sample, timestep, cond):
        self.calls.append((sample.shape[0], {k: getattr(v, "shape", v) for k, v in cond.items()}))
        bias = (
            cond["encoder_hidden_states"].mean(dim=(1, 2)).view(-1, 1, 1, 1) if "encoder_hidden_states" in cond else 0
        )
        return 0.1 * sample + bias


def ddim() -> object:
    return BUILTIN_SCHEDULERS["ddim"][1](SD_SCHEDULE)


def test_guidance_is_one_batched_call_per_step_and_matches_two_calls() -> None:
    cond = {"encoder_hidden_states": torch.full((1, 3, 4), 2.0)}
    uncond = {"encoder_hidden_states": torch.zeros((1, 3, 4))}
    d = CountingDenoiser()
    out = sample(
        d,
        ddim(),
        steps=4,
        context=RunContext(registry=Registry(), seed=5),
        shape=(1, 2, 8, 8),
        cond=cond,
        uncond=uncond,
        guidance_scale=7.5,
    )
    assert [batch for batch, _ in d.calls] == [2, 2, 2, 2]

    # The same guidance computed by hand with separate calls.
    scheduler, context = ddim(), RunContext(registry=Registry(), seed=5)
    scheduler.set_timesteps(4)
    x = torch.randn((1, 2, 8, 8), generator=context.generator)
    ref = CountingDenoiser()
    for t in scheduler.timesteps:
        u, c = ref(x, t, uncond), ref(x, t, cond)
        x = scheduler.step(u + 7.5 * (c - u), t, x).prev_sample
    torch.testing.assert_close(out, x)


def test_cancel_stops_within_one_step() -> None:
    token = CancelToken()
    d = CountingDenoiser()
    seen: list[int] = []

    def progress(step: int, total: int, preview: object) -> None:
        seen.append(step)
        if step == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        sample(
            d,
            ddim(),
            steps=10,
            context=RunContext(registry=Registry(), progress=progress, cancel=token),
            shape=(1, 2, 8, 8),
        )
    assert len(d.calls) == 2 and seen == [1, 2]


def test_img2img_runs_only_the_last_steps_from_the_noised_init() -> None:
    d = CountingDenoiser()
    init = torch.ones(1, 2, 8, 8)
    sample(d, ddim(), steps=10, strength=0.3, init=init, context=RunContext(registry=Registry()))
    assert len(d.calls) == 3


def test_step_hook_and_progress_and_previews() -> None:
    hooked: list[tuple[int, object]] = []
    reports: list[tuple[int, int, object]] = []

    def hook(index, next_t, x):
        hooked.append((index, None if next_t is None else int(next_t)))
        return torch.zeros_like(x)

    context = RunContext(registry=Registry(), progress=lambda s, n, p: reports.append((s, n, p)), preview_every=2)
    out = sample(
        CountingDenoiser(),
        ddim(),
        steps=4,
        context=context,
        shape=(1, 2, 4, 4),
        step_hook=hook,
        decode_preview=lambda x0: ("preview", tuple(x0.shape)),
    )
    assert torch.count_nonzero(out) == 0
    assert [i for i, _ in hooked] == [0, 1, 2, 3] and hooked[-1][1] is None
    assert [(s, n) for s, n, _ in reports] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [p is not None for _, _, p in reports] == [False, True, False, True]


def test_same_seed_same_output_different_seed_different() -> None:
    a = sample(CountingDenoiser(), ddim(), steps=3, context=RunContext(registry=Registry(), seed=1), shape=(1, 2, 4, 4))
    b = sample(CountingDenoiser(), ddim(), steps=3, context=RunContext(registry=Registry(), seed=1), shape=(1, 2, 4, 4))
    c = sample(CountingDenoiser(), ddim(), steps=3, context=RunContext(registry=Registry(), seed=2), shape=(1, 2, 4, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
