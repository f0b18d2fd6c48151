"""A training loader that resumes mid-epoch at the exact batch, with the same shuffle, on any number of processes.

Lightning saves the state of loaders that implement ``state_dict``/``load_state_dict`` in its checkpoints. The
data position is the number of training batches processed in the whole run, read from the Trainer's own
progress counters: not from the loader's iterator, which runs one batch ahead of training because Lightning
prefetches, and not from Lightning's epoch counter, which counts an epoch cut short by ``max_steps`` as done.
Data epoch ``e`` therefore always means batches ``e·len … (e+1)·len − 1`` of the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

#: returns the number of training batches processed so far in the run (restored with checkpoints)
ProgressFn = Callable[[], int]


class ResumableLoader:
    """Seeded, sharded batches of a map-style dataset; its state is the data position.

    Epoch ``e`` shuffles with seed ``seed + e`` (every process draws the same permutation, then takes every
    ``world_size``-th index from ``rank``; the permutation is wrapped around so every process gets the same
    number of batches, as ``DistributedSampler`` does, and no process waits forever in a collective).

    Args:
        dataset: map-style dataset.
        batch_size: examples per batch (per process).
        collate_fn: builds a batch from a list of examples.
        progress: ``() -> training batches processed so far in the run``, usually read from the Trainer.
        shuffle: shuffle every epoch.
        seed: base seed of the shuffles.
        drop_last: drop a final incomplete batch (unless it is the only one).
        rank: this process's index; ``world_size``: number of processes.
        num_workers: worker processes of the underlying DataLoader.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any],
        progress: ProgressFn,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.progress = progress
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self._resume: int | None = None
        #: the data position the latest iterator started from (None before the first iteration)
        self.started_at: int | None = None

    def batches(self, epoch: int) -> list[list[int]]:
        """Index lists of this process's batches in ``epoch``."""
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(n))
        per_rank = math.ceil(n / self.world_size)
        order = (order * math.ceil(per_rank * self.world_size / n))[: per_rank * self.world_size]
        mine = order[self.rank :: self.world_size]
        batches = [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        if self.drop_last and len(batches) > 1 and len(batches[-1]) < self.batch_size:
            batches.pop()  # but never the only batch
        return batches

    def __len__(self) -> int:
        per_rank = math.ceil(len(self.dataset) / self.world_size)
        full, partial = divmod(per_rank, self.batch_size)
        return full + int(partial > 0 and (not self.drop_last or full == 0))

    def __iter__(self) -> Iterator[Any]:
        position = self._resume if self._resume is not None else self.progress()
        self._resume = None
        self.started_at = position
        epoch, skip = divmod(position, max(len(self), 1))
        remaining = self.batches(epoch)[skip:]
        if not remaining:
            return iter(())
        return iter(
            DataLoader(self.dataset, batch_sampler=remaining, collate_fn=self.collate_fn, num_workers=self.num_workers)
        )

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": self.progress(), "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"checkpoint data order used seed {state['seed']}, this run uses {self.seed}")
        self._resume = int(state["batches_done"])
