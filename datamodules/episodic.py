"""The base LightningDataModule for few-shot episodes: sizes, seeds and dataloaders.

Subclasses say where tasks come from (:meth:`EpisodicDataModule.task_source`); this class turns a
task source into train/val/test dataloaders of :class:`~lit_meta.episode.Episode` batches, one
meta-batch per step, deterministic from (seed, split, epoch, step) and split across DDP ranks.
"""

from __future__ import annotations

import os

import lightning as L
from torch.utils.data import DataLoader

from torch import Tensor

from .sampler import SPLITS, ClassImageTasks, EpisodeDataset, EpisodeLoader, EpisodeSampler, TaskSource


def require_positive(**values: int) -> None:
    """Raise ``ValueError`` naming the first argument that is not a positive integer."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer (>= 1)")


class EpisodicDataModule(L.LightningDataModule):
    """Serves meta-batches of few-shot tasks.

    Args:
        meta_batch_size: tasks per training step, summed over all processes (each of W DDP ranks
            gets ``meta_batch_size / W``). Default 32.
        steps_per_epoch: training meta-batches per epoch. Default 1000.
        eval_episodes: size of the fixed validation and test episode sets. Default 600.
        eval_meta_batch_size: tasks per validation/test step (must divide ``eval_episodes``). Default 20.
        seed: seed of the episode draws; ``None`` takes the seed given to ``seed_everything``
            (``seed_everything:`` in the config), else 0.
        num_workers: DataLoader worker processes. Default 0 (assembly is cheap).
    """

    def __init__(self, meta_batch_size: int = 32, steps_per_epoch: int = 1000, eval_episodes: int = 600,
                 eval_meta_batch_size: int = 20, seed: int | None = None, num_workers: int = 0) -> None:
        super().__init__()
        require_positive(meta_batch_size=meta_batch_size, steps_per_epoch=steps_per_epoch,
                         eval_episodes=eval_episodes, eval_meta_batch_size=eval_meta_batch_size)
        if eval_episodes % eval_meta_batch_size:
            raise ValueError(f"eval_meta_batch_size={eval_meta_batch_size} must divide eval_episodes={eval_episodes}")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        self.meta_batch_size, self.steps_per_epoch = meta_batch_size, steps_per_epoch
        self.eval_episodes, self.eval_meta_batch_size = eval_episodes, eval_meta_batch_size
        self._seed, self.num_workers = seed, num_workers

    @property
    def seed(self) -> int:
        if self._seed is not None:
            return self._seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def task_source(self, split: str) -> TaskSource:
        """The task source of ``split`` ('train', 'val' or 'test'); called after ``setup``."""
        raise NotImplementedError

    def dataset(self, split: str) -> EpisodeDataset:
        """The episode dataset of ``split`` for this process (rank-aware when a Trainer is attached)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if split == "train":
            size, steps = self.meta_batch_size, self.steps_per_epoch
        else:
            size, steps = self.eval_meta_batch_size, self.eval_episodes // self.eval_meta_batch_size
        return EpisodeDataset(self.task_source(split), self.seed, split, size, steps, rank, world)

    def _loader(self, split: str) -> DataLoader:
        dataset = self.dataset(split)
        # Pinned host memory makes the uint8 -> GPU copy asynchronous; only worth it when a GPU trains.
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        kwargs = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0, pin_memory=on_cuda)
        if split == "train":  # resumable mid-epoch; validation/test always run whole
            return EpisodeLoader(dataset, EpisodeSampler(len(dataset)), **kwargs)
        return DataLoader(dataset, batch_size=None, sampler=EpisodeSampler(len(dataset), fixed=True), **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class ClassImageDataModule(EpisodicDataModule):
    """N-way K-shot classification episodes from per-split uint8 image tensors.

    Subclasses load their data in ``setup`` and call :meth:`set_split_images` with, per split, a
    tensor ``[n_classes, n_samples, C, H, W]``; sizes are checked there, before any step runs.

    Args:
        n_way: classes per task. Default 5.
        k_shot: support examples per class. Default 1.
        k_query: query examples per class. Default 15.
        **kwargs: see :class:`EpisodicDataModule`.
    """

    def __init__(self, n_way: int = 5, k_shot: int = 1, k_query: int = 15, **kwargs) -> None:
        super().__init__(**kwargs)
        require_positive(n_way=n_way, k_shot=k_shot, k_query=k_query)
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query
        self.split_images: dict[str, Tensor] = {}

    def set_split_images(self, images: dict[str, Tensor], what: str = "classes") -> None:
        """Check the episode sizes against each split's tensor and keep them."""
        for split, tensor in images.items():
            n_classes, n_samples = tensor.shape[:2]
            if self.n_way > n_classes:
                raise ValueError(
                    f"n_way={self.n_way} is larger than the {n_classes} {what} of the {split!r} split; "
                    f"use n_way <= {n_classes} (or a split with more {what})"
                )
            if self.k_shot + self.k_query > n_samples:
                raise ValueError(
                    f"k_shot + k_query = {self.k_shot} + {self.k_query} = {self.k_shot + self.k_query} is larger "
                    f"than the {n_samples} samples per class of the {split!r} split; "
                    f"use k_shot + k_query <= {n_samples}"
                )
        self.split_images = dict(images)

    def task_source(self, split: str) -> TaskSource:
        if split not in self.split_images:
            raise RuntimeError(f"no {split!r} data: call setup() before asking for dataloaders")
        return ClassImageTasks(self.split_images[split], self.n_way, self.k_shot, self.k_query)
