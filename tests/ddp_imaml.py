"""Helper for test_meta_learners.py: meta-train iMAML on sinusoids with N CPU processes, save theta.

    python tests/ddp_imaml.py OUT_FILE DEVICES

The data's meta_batch_size (8) is the GLOBAL meta-batch: with 2 processes each rank gets 4 of the
same 8 tasks a single process gets, so the final parameters must agree.
"""

import sys

import lightning as L
import torch

from lit_meta import IMAML, MLP
from lit_meta.datamodules import SinusoidDataModule

if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    L.seed_everything(3)
    torch.set_default_dtype(torch.float64)  # compare to tight tolerance
    model = IMAML(MLP(hidden=(16, 16)), lam=1.0, inner_steps=3, inner_lr=0.05, cg_steps=3)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = SinusoidDataModule(meta_batch_size=8, steps_per_epoch=4, k_shot=5, k_query=5)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=4,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, data)
    if trainer.global_rank == 0:
        torch.save({"initial": initial, "final": {k: v.detach().clone() for k, v in model.state_dict().items()}}, out)
