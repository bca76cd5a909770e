"""Few-shot classification episodes from learn2learn task datasets (optional dependency).

learn2learn (``bash scripts/install_learn2learn.sh``) is imported only when a
:class:`Learn2LearnDataModule` is constructed, so this module imports without it.

learn2learn draws its tasks with Python's global ``random`` module. To keep episodes deterministic
from ``(seed, split, epoch, step)`` and rank-consistent like every other lit-meta source,
:class:`Learn2LearnTasks` draws one integer seed per task of the WHOLE meta-batch from the episode
generator, and builds this rank's tasks each under its own seed: the global ``random``, NumPy and
torch (CPU) generators are seeded for the draw and restored afterwards, so sampling leaves no trace
on them. The union over ranks' slices is therefore the single-process meta-batch by construction.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lit_meta.episode import Episode

from .episodic import EpisodicDataModule, require_positive
from .sampler import SPLITS, TaskSource

INSTALL_HINT = "run `bash scripts/install_learn2learn.sh` (it builds learn2learn 0.2.0 from source)"


def import_learn2learn() -> Any:
    """The ``learn2learn`` module, or an ``ImportError`` saying how to install it."""
    try:
        import learn2learn
    except ImportError as error:
        raise ImportError(f"Learn2LearnDataModule needs learn2learn, which is not installed: {INSTALL_HINT}") from error
    return learn2learn


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # CPU only: leaves CUDA generators alone


class _GlobalRNGGuard:
    """Saves the global ``random``, NumPy and torch CPU generator states; restores them on exit."""

    def __enter__(self) -> None:
        self.states = random.getstate(), np.random.get_state(), torch.get_rng_state()

    def __exit__(self, *exc: object) -> None:
        py, npy, pt = self.states
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(pt)


class Learn2LearnTasks:
    """A :class:`~datamodules.sampler.TaskSource` over a learn2learn ``TaskDataset``.

    Each task of the task dataset must hold ``n_way`` classes with ``k_shot + k_query`` examples
    each; its labels are mapped to ``0..n_way-1`` in sorted order of the labels it carries (the
    identity when the task transforms end in ``RemapLabels``, which already assigns them at random).
    Per class, the first ``k_shot`` examples are support and the rest query; both are ordered by
    label, as in :class:`~datamodules.sampler.ClassImageTasks`. Dtypes are kept (uint8 stays uint8).

    A task dataset with ``num_tasks=-1`` (learn2learn's default) draws a fresh task per draw. One with
    a fixed pool (``num_tasks > 0``) draws a pool index per task; the description of pool task ``i``
    is sampled from a seed depending only on ``(pool_seed, i)``, so every process and worker caches
    the same pool whatever order it meets the indices in.

    Args:
        task_dataset: a ``learn2learn.data.TaskDataset``.
        n_way: classes per task.
        k_shot: support examples per class.
        k_query: query examples per class.
        pool_seed: seed of the descriptions of a fixed task pool. Default 0.
    """

    def __init__(self, task_dataset: Any, n_way: int, k_shot: int, k_query: int, pool_seed: int = 0) -> None:
        self.task_dataset = task_dataset
        self.n_way, self.k_shot, self.k_query, self.pool_seed = n_way, k_shot, k_query, pool_seed
        self.support_y = torch.arange(n_way).repeat_interleave(k_shot)
        self.query_y = torch.arange(n_way).repeat_interleave(k_query)

    def _load(self, seed: int) -> Any:
        """One task of the task dataset, drawn under ``seed`` (global generators must be guarded)."""
        dataset = self.task_dataset
        num_tasks = getattr(dataset, "num_tasks", -1)
        if num_tasks == -1:
            _seed_all(seed)
            return dataset.sample()
        index = seed % num_tasks
        if index not in dataset.sampled_descriptions:
            pool_seed = np.random.SeedSequence([self.pool_seed, index]).generate_state(2, dtype=np.uint32)
            _seed_all(int(pool_seed[0]) << 32 | int(pool_seed[1]))
            dataset.sampled_descriptions[index] = dataset.sample_task_description()
        _seed_all(seed)  # randomness while loading the data (e.g. augmentations) follows the draw
        return dataset[index]

    def split_task(self, task: Any) -> tuple[Tensor, Tensor]:
        """``(support_x [N*K, ...], query_x [N*Q, ...])`` of one learn2learn task ``(x, y, ...)``."""
        n, k, q = self.n_way, self.k_shot, self.k_query
        x, y = torch.as_tensor(task[0]), torch.as_tensor(task[1])
        if y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"a learn2learn task must be (x, y) with x [M, ...] and labels y [M]; got x of shape "
                f"{tuple(x.shape)} and y of shape {tuple(y.shape)}"
            )
        classes, labels, counts = torch.unique(y, sorted=True, return_inverse=True, return_counts=True)
        if len(classes) != n or bool((counts != k + q).any()):
            raise ValueError(
                f"a task of the learn2learn TaskDataset has {len(classes)} classes with "
                f"{sorted(set(counts.tolist()))} examples per class, but this DataModule expects n_way={n} classes "
                f"with k_shot + k_query = {k} + {q} = {k + q} examples each: the TaskDataset's task transforms "
                f"must draw n_way classes with k_shot + k_query samples each, e.g. NWays(dataset, {n}), "
                f"KShots(dataset, {k + q}), or set n_way/k_shot/k_query to match them"
            )
        order = torch.sort(labels, stable=True).indices.view(n, k + q)  # by label, keeping the draw's order
        return x[order[:, :k].reshape(-1)], x[order[:, k:].reshape(-1)]

    def __call__(self, generator: torch.Generator, n_tasks: int, tasks: slice) -> Episode:
        seeds = torch.randint(0, 2**63 - 1, (n_tasks,), generator=generator)[tasks].tolist()
        with _GlobalRNGGuard():
            loaded = [self._load(seed) for seed in seeds]
        support, query = zip(*(self.split_task(task) for task in loaded))
        t = len(seeds)
        return Episode(torch.stack(support), self.support_y.expand(t, -1), torch.stack(query),
                       self.query_y.expand(t, -1))


class Learn2LearnDataModule(EpisodicDataModule):
    """N-way K-shot classification episodes from learn2learn datasets (needs learn2learn installed).

    Each split takes either a ``learn2learn.data.TaskDataset`` (its task transforms must draw
    ``n_way`` classes with ``k_shot + k_query`` examples each; labels need not be remapped) or a
    ``learn2learn.data.MetaDataset``, for which the standard task transforms are built:
    ``NWays(n_way)``, ``KShots(k_shot + k_query)``, ``LoadData``, ``RemapLabels``, ``ConsecutiveLabels``.
    Episodes are deterministic from ``(seed, split, epoch, step)`` and split across DDP ranks like
    every lit-meta DataModule; sampling leaves the global ``random``/NumPy/torch generators unchanged.

    Args:
        train_tasks: the training TaskDataset or MetaDataset.
        val_tasks: the validation TaskDataset or MetaDataset. Default ``None``: no validation split
            (train with ``Trainer(limit_val_batches=0)``).
        test_tasks: the test TaskDataset or MetaDataset. Default ``None``: no test split.
        n_way: classes per task. Default 5.
        k_shot: support examples per class. Default 1.
        k_query: query examples per class. Default 15.
        **kwargs: see :class:`EpisodicDataModule` (``meta_batch_size=32``, ``steps_per_epoch=1000``,
            ``eval_episodes=600``, ``eval_meta_batch_size=20``, ``seed=None``, ``num_workers=0``).

    Raises:
        ImportError: learn2learn is not installed (run ``bash scripts/install_learn2learn.sh``).
    """

    def __init__(self, train_tasks: Any, val_tasks: Any = None, test_tasks: Any = None, n_way: int = 5,
                 k_shot: int = 1, k_query: int = 15, **kwargs: Any) -> None:
        l2l = import_learn2learn()
        super().__init__(**kwargs)
        require_positive(n_way=n_way, k_shot=k_shot, k_query=k_query)
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query
        if train_tasks is None:
            raise ValueError("train_tasks is required: a learn2learn TaskDataset or MetaDataset")
        given = dict(zip(SPLITS, (train_tasks, val_tasks, test_tasks)))
        self.task_datasets: dict[str, Any] = {
            split: self._task_dataset(l2l, split, tasks) for split, tasks in given.items() if tasks is not None
        }

    def _task_dataset(self, l2l: Any, split: str, tasks: Any) -> Any:
        if isinstance(tasks, l2l.data.Taskset):  # TaskDataset subclasses Taskset in learn2learn 0.2.0
            return tasks
        if not isinstance(tasks, l2l.data.MetaDataset):
            raise TypeError(
                f"{split}_tasks must be a learn2learn.data.TaskDataset or MetaDataset, got {type(tasks).__name__}; "
                f"wrap a torch Dataset in learn2learn.data.MetaDataset(dataset)"
            )
        n, kq = self.n_way, self.k_shot + self.k_query
        labels = list(tasks.labels)
        if n > len(labels):
            raise ValueError(
                f"n_way={n} is larger than the {len(labels)} classes of the {split!r} MetaDataset; "
                f"use n_way <= {len(labels)}"
            )
        fewest = min(len(tasks.labels_to_indices[label]) for label in labels)
        if kq > fewest:
            raise ValueError(
                f"k_shot + k_query = {self.k_shot} + {self.k_query} = {kq} is larger than the {fewest} samples of the "
                f"smallest class of the {split!r} MetaDataset; use k_shot + k_query <= {fewest}"
            )
        t = l2l.data.transforms
        transforms = [t.NWays(tasks, n), t.KShots(tasks, kq), t.LoadData(tasks), t.RemapLabels(tasks),
                      t.ConsecutiveLabels(tasks)]
        return l2l.data.Taskset(tasks, task_transforms=transforms, num_tasks=-1)

    def task_source(self, split: str) -> TaskSource:
        if split not in self.task_datasets:
            raise RuntimeError(
                f"no {split!r} tasks: pass {split}_tasks= (a learn2learn TaskDataset or MetaDataset) to "
                f"Learn2LearnDataModule" + (", or train with Trainer(limit_val_batches=0)" if split == "val" else "")
            )
        return Learn2LearnTasks(self.task_datasets[split], self.n_way, self.k_shot, self.k_query, self.seed)
