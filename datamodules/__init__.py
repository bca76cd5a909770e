"""LightningDataModules of lit-meta (installed as ``lit_meta.datamodules``)."""

from .episodic import ClassImageDataModule, EpisodicDataModule
from .learn2learn import Learn2LearnDataModule
from .miniimagenet import MiniImageNetDataModule
from .omniglot import OmniglotDataModule
from .sinusoid import SinusoidDataModule, SinusoidTasks
from .sampler import ClassImageTasks, EpisodeDataset, EpisodeSampler, episode_generator

__all__ = ["EpisodicDataModule", "ClassImageDataModule", "OmniglotDataModule", "MiniImageNetDataModule", "Learn2LearnDataModule", "SinusoidDataModule", "SinusoidTasks",
           "ClassImageTasks", "EpisodeDataset", "EpisodeSampler", "episode_generator"]
