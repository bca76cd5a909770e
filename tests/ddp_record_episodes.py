"""Helper for test_ddp.py: a 2-process CPU DDP fit that saves every batch each rank receives.

    python tests/ddp_record_episodes.py OUT_DIR
"""

import sys
from pathlib import Path

import lightning as L
import torch

from lit_meta.datamodules import SinusoidDataModule


class Recorder(L.LightningModule):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = Path(out)
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        torch.save(batch.support_x, self.out / f"rank{self.global_rank}_epoch{self.current_epoch}_step{batch_idx}.pt")
        return self.layer(batch.support_x).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


if __name__ == "__main__":
    out = sys.argv[1]
    L.seed_everything(5)
    data = SinusoidDataModule(meta_batch_size=4, steps_per_epoch=2, k_shot=3, k_query=3)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Recorder(out), data)
