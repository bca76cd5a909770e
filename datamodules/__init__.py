"""LightningDataModules of lit-meta (installed as ``lit_meta.datamodules``)."""

from .episodic import ClassImageDataModule, EpisodicDataModule
from .learn2learn import Learn2LearnDataModule
from .miniimagenet import MiniImageNetDataModule
from .omniglot import OmniglotDataModule
from .sinusoid import SinusoidDataModule, SinusoidTasks
from .sampler import ClassImageTasks, EpisodeDataset, EpisodeLoader, EpisodeSampler, episode_generator

__all__ = ["EpisodicDataModule", "ClassImageDataModule", "OmniglotDataModule", "MiniImageNetDataModule", "Learn2LearnDataModule", "RolloutDataModule", "SinusoidDataModule", "SinusoidTasks",
           "ClassImageTasks", "EpisodeDataset", "EpisodeLoader", "EpisodeSampler", "episode_generator"]


def __getattr__(name: str):
    # Imported on first use: it loads the RL stack (torchrl), which few-shot users do not need.
    if name == "RolloutDataModule":
        from .rollouts import RolloutDataModule

        return RolloutDataModule
    raise AttributeError(f"module 'lit_meta.datamodules' has no attribute {name!r}")
