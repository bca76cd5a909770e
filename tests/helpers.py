"""Small test doubles shared by the test modules (tests/ is on sys.path under pytest)."""

import lightning as L
from torch.utils.data import DataLoader


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
