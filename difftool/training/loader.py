"""Batches made ahead in worker processes, for training on a fast device (``workers`` > 0 in the config).

Batch ``i`` (:func:`difftool.training.train.step_batch`) is a function of ``(seed, i)`` alone: its crops
and degradations come from ``np.random.default_rng([seed, i])``, its timesteps and noise from a CPU torch
generator seeded from that stream. So the data is the same whatever the number of workers, and a run
resumed at step ``i`` goes on with batch ``i`` (nothing of the stream needs saving). torch's
``DataLoader`` runs the workers (forked where the platform forks, so the image pool is shared rather than
copied), keeps ``PREFETCH`` batches per worker ready, hands them over in step order and, for a GPU, in
pinned memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

#: Batches each worker keeps ready.
PREFETCH = 4


#: ``make(config, pool, step)``: batch ``step`` of the run (:func:`difftool.training.train.step_batch`).
MakeBatch = Callable[[Any, Any, int], dict[str, Any]]


class StepBatches(torch.utils.data.Dataset):
    """The run's batches, indexed by step."""

    def __init__(self, config: Any, pool: Any, make: MakeBatch) -> None:
        self.config, self.pool, self.make = config, pool, make

    def __len__(self) -> int:
        return int(self.config.steps)

    def __getitem__(self, step: int) -> dict[str, Any]:
        return self.make(self.config, self.pool, step)


def batches(
    config: Any, pool: Any, start: int, end: int, make: MakeBatch, pin: bool = False
) -> Iterator[dict[str, Any]]:
    """Batches ``start`` .. ``end - 1`` from ``config.workers`` processes; drop the iterator to end them."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        StepBatches(config, pool, make),
        batch_size=None,  # each item is a whole batch
        sampler=range(start, end),
        num_workers=config.workers,
        prefetch_factor=PREFETCH,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(config.seed),  # the workers' base seed: not the global RNG
    )
    return iter(loader)
