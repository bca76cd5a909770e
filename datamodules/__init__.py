"""LightningDataModules of lit-meta (installed as ``lit_meta.datamodules``)."""

from .episodic import ClassImageDataModule, EpisodicDataModule
from .omniglot import OmniglotDataModule
from .sinusoid import SinusoidDataModule, SinusoidTasks
from .sampler import ClassImageTasks, EpisodeDataset, EpisodeSampler, episode_generator

__all__ = ["EpisodicDataModule", "ClassImageDataModule", "OmniglotDataModule", "SinusoidDataModule", "SinusoidTasks",
           "ClassImageTasks", "EpisodeDataset", "EpisodeSampler", "episode_generator"]
