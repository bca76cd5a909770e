"""Episode sampling by index arithmetic, deterministic from (seed, split, epoch, step), rank-aware.

How a meta-batch is made:
1. ``EpisodeSampler`` yields keys ``(epoch, step)``; it is a ``DistributedSampler`` so Lightning
   leaves it in place under DDP (the rank split happens here, not by striding indices).
2. ``EpisodeDataset[(epoch, step)]`` seeds a ``torch.Generator`` from ``(seed, split, epoch, step)``,
   draws the WHOLE meta-batch's random choices, and keeps this rank's contiguous slice of tasks.
   So the union over ranks equals what one process with the whole meta-batch draws.
3. A task source (e.g. :class:`ClassImageTasks`) turns the generator into tensors: no per-image
   Python work, images stay uint8.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lit_meta.episode import Episode

SPLITS = ("train", "val", "test")


def episode_generator(seed: int, *key: int) -> torch.Generator:
    """A generator seeded from ``(seed, *key)`` by NumPy's SeedSequence (well mixed, no collisions by addition)."""
    state = np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class TaskSource(Protocol):
    """Draws ``n_tasks`` tasks' random choices from ``generator`` and builds those in ``tasks``."""

    def __call__(self, generator: torch.Generator, n_tasks: int, tasks: slice) -> Episode: ...


class ClassImageTasks:
    """N-way K-shot classification tasks from a uint8 image tensor ``[n_classes, n_samples, C, H, W]``.

    Per task: ``n_way`` distinct classes (their order is the task's random label assignment), and per
    class ``k_shot + k_query`` distinct samples: the first ``k_shot`` are support, the rest query.
    """

    def __init__(self, images: Tensor, n_way: int, k_shot: int, k_query: int) -> None:
        if images.dim() != 5:
            raise ValueError(f"images must be [n_classes, n_samples, C, H, W], got shape {tuple(images.shape)}")
        self.n_classes, self.n_samples = images.shape[:2]
        self.flat = images.flatten(0, 1)  # [n_classes * n_samples, C, H, W]
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query
        self.support_y = torch.arange(n_way).repeat_interleave(k_shot)
        self.query_y = torch.arange(n_way).repeat_interleave(k_query)

    def __call__(self, generator: torch.Generator, n_tasks: int, tasks: slice) -> Episode:
        n, k, q = self.n_way, self.k_shot, self.k_query
        # n_way distinct classes per task: the n smallest of n_classes uniform keys.
        classes = torch.rand(n_tasks, self.n_classes, generator=generator).topk(n, dim=1, largest=False).indices
        # k + q distinct samples per class.
        samples = torch.rand(n_tasks, n, self.n_samples, generator=generator).topk(k + q, dim=2, largest=False).indices
        flat = classes[tasks, :, None] * self.n_samples + samples[tasks]  # [t, n, k + q]
        t = flat.shape[0]
        support = self.flat[flat[:, :, :k].reshape(-1)].view(t, n * k, *self.flat.shape[1:])
        query = self.flat[flat[:, :, k:].reshape(-1)].view(t, n * q, *self.flat.shape[1:])
        return Episode(support, self.support_y.expand(t, -1), query, self.query_y.expand(t, -1))


class EpisodeDataset(Dataset):
    """Map-style dataset whose item ``(epoch, step)`` is this rank's share of one meta-batch."""

    def __init__(self, source: TaskSource, seed: int, split: str, meta_batch_size: int,
                 n_steps: int, rank: int = 0, world_size: int = 1) -> None:
        if meta_batch_size % world_size:
            raise ValueError(
                f"meta_batch_size={meta_batch_size} ({split}) does not divide over {world_size} processes; "
                f"use a multiple of {world_size} so every rank gets the same number of tasks"
            )
        self.source, self.seed, self.split_id = source, seed, SPLITS.index(split)
        self.meta_batch_size, self.n_steps = meta_batch_size, n_steps
        per_rank = meta_batch_size // world_size
        self.tasks = slice(rank * per_rank, (rank + 1) * per_rank)

    def __len__(self) -> int:
        return self.n_steps

    def __getitem__(self, key: tuple[int, int]) -> Episode:
        epoch, step = key
        generator = episode_generator(self.seed, self.split_id, epoch, step)
        return self.source(generator, self.meta_batch_size, self.tasks)


class EpisodeSampler(DistributedSampler):
    """Yields ``(epoch, step)`` keys for :class:`EpisodeDataset`.

    It subclasses ``DistributedSampler`` only so that Lightning does not wrap it under DDP: every
    rank iterates the same keys and :class:`EpisodeDataset` gives each rank its own tasks.
    ``fixed=True`` (validation/test) always uses epoch 0: the same seeded episodes every time.
    """

    def __init__(self, n_steps: int, fixed: bool = False) -> None:  # no super().__init__: no process group needed
        self.n_steps, self.fixed = n_steps, fixed
        self.epoch = 0
        self.shuffle = not fixed  # what Lightning reads to tell a shuffled loader
        self.start = 0  # first step of the epoch being iterated (> 0 only when resuming mid-epoch)
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, step: int) -> None:
        """Make the next iteration start at ``step`` if it is of ``epoch`` (a mid-epoch checkpoint's position)."""
        self._resume = (epoch, step)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = 0 if self.fixed else self.epoch
        resume, self._resume = self._resume, None
        self.start = resume[1] if resume is not None and resume[0] == epoch and 0 < resume[1] < self.n_steps else 0
        return iter([(epoch, step) for step in range(self.start, self.n_steps)])

    def __len__(self) -> int:
        return self.n_steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class EpisodeLoader(DataLoader):
    """The training DataLoader over :class:`EpisodeSampler` keys; resumable mid-epoch.

    Lightning stores ``state_dict()`` in every checkpoint (it does so for any loader with
    ``state_dict``/``load_state_dict``) and hands it back on resume: the position is (epoch, meta-batches
    served), so a run resumed from a mid-epoch checkpoint continues with the next meta-batch, exactly as
    the uninterrupted run would. Counted where batches leave the loader, so worker prefetching does not
    shift it.
    """

    def __init__(self, dataset: EpisodeDataset, sampler: EpisodeSampler, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, sampler=sampler, **kwargs)
        self._position = (0, 0)

    def __iter__(self) -> Iterator[Any]:
        # A generator: the sampler is iterated at the first ``next``, after Lightning's ``set_epoch`` (Lightning
        # calls ``iter`` on the loader before it sets the epoch of a resumed run).
        iterator = super().__iter__()  # iterates the sampler: its epoch and start are set from here on
        served = self.sampler.start
        for batch in iterator:
            served += 1
            self._position = (self.sampler.epoch, served)
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch, served = self._position
        return {"epoch": epoch, "served": served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(int(state["epoch"]), int(state["served"]))
