"""Helper for test_ddp.py: a 2-process CPU DDP fit that saves every batch each rank receives.

    python tests/ddp_record_episodes.py OUT_DIR [sinusoid|rollouts]

With ``rollouts``, the data is a RolloutDataModule on the test env of rl_fakes.py, one aggregation round
runs at the start of epoch 1 (with a deterministic policy), and each rank also saves its replay buffer.
"""

import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lit_meta.datamodules import SinusoidDataModule  # noqa: E402
from lit_meta.datamodules.rollouts import RolloutDataModule  # noqa: E402
from lit_meta.cli import release_process_group  # noqa: E402


def rollout_datamodule() -> RolloutDataModule:
    from rl_fakes import ENV_ID

    return RolloutDataModule(env_id=ENV_ID, env_kwargs={"change_every": 20}, past_window=4, future_window=3,
                             initial_rollouts=3, rollouts_per_round=3, rollout_length=40, val_rollouts=2, n_envs=2,
                             meta_batch_size=4, steps_per_epoch=2, seed=5)


def push_right(obs: np.ndarray) -> np.ndarray:
    return np.full((len(obs), 1), 0.5, dtype=np.float32)


class Recorder(L.LightningModule):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = Path(out)
        self.layer = torch.nn.Linear(1, 1)

    def on_train_epoch_start(self) -> None:
        data = self.trainer.datamodule
        if self.current_epoch > 0 and isinstance(data, RolloutDataModule):
            data.aggregate(push_right)

    def training_step(self, batch, batch_idx):
        torch.save(batch[0], self.out / f"rank{self.global_rank}_epoch{self.current_epoch}_step{batch_idx}.pt")
        return self.layer(batch[0][..., :1]).mean()

    def on_train_end(self) -> None:
        data = self.trainer.datamodule
        if isinstance(data, RolloutDataModule):
            torch.save(data.buffer.state_dict(), self.out / f"rank{self.global_rank}_buffer.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


if __name__ == "__main__":
    out, kind = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "sinusoid")
    L.seed_everything(5)
    data = (SinusoidDataModule(meta_batch_size=4, steps_per_epoch=2, k_shot=3, k_query=3) if kind == "sinusoid"
            else rollout_datamodule())
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Recorder(out), data)
    release_process_group()  # as train.py does: gloo torn down at interpreter exit aborted now and then (SIGABRT)
