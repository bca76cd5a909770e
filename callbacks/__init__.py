"""Lightning callbacks that log what a meta-learning researcher wants to see (W&B media, any-logger scalars).

Import as ``lit_meta.callbacks``. Scalars go through ``pl_module.log`` (every Lightning logger gets them);
media (line plots, images, videos, tables) need a ``WandbLogger`` and are made on global rank 0 only;
with another logger they are skipped with one notice. Callbacks only read what the learners log and keep.

- :class:`RunSummary`: code version and config in the run config, W&B offline when there is no API key or
  network (says so once), a summary table of the headline metrics at the end.
- :class:`MetaLearningMonitor`: few-shot learners: tasks/s, peak memory, lam, the inner-loss curve and a
  validation-episode grid image.
- :class:`DynamicsMonitor`: dynamics learners: planner ms/step and NaN candidates, episode returns per split,
  rollout videos.
"""

from .meta import MetaLearningMonitor, episode_grid
from .rl import DynamicsMonitor, write_gif
from .run import RunSummary, code_version, peak_memory_mb

__all__ = ["DynamicsMonitor", "MetaLearningMonitor", "RunSummary", "code_version", "episode_grid",
           "peak_memory_mb", "write_gif"]
