"""Small test doubles shared by the test modules (tests/ is on sys.path under pytest)."""

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


def half_conv_error() -> str | None:
    """Why this CPU build cannot run a float16 convolution, or None where it can."""
    try:
        F.conv2d(torch.ones(1, 1, 3, 3, dtype=torch.float16), torch.ones(1, 1, 3, 3, dtype=torch.float16))
    except RuntimeError as error:
        return str(error)
    return None


class OneEpisode(L.LightningDataModule):
    """A 5-way DataModule that serves one given Episode for training and validation."""

    n_way = 5

    def __init__(self, episode):
        super().__init__()
        self.episode = episode

    def train_dataloader(self):
        return DataLoader([self.episode], batch_size=None)

    def val_dataloader(self):
        return DataLoader([self.episode], batch_size=None)
