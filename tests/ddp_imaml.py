"""Helper for test_meta_learners.py: meta-train iMAML with N CPU processes, save theta (float64).

    python tests/ddp_imaml.py OUT_FILE DEVICES [sinusoid|omniglot]

sinusoid: an MLP (the generic vmap path); omniglot: a small Conv4 on the real minimal Omniglot (the
task-folded grouped-convolution path), from $LIT_META_DATA/omniglot.

The data's meta_batch_size (8) is the GLOBAL meta-batch: with 2 processes each rank gets 4 of the
same 8 tasks a single process gets, so the final parameters must agree.
"""

import os
import sys

import lightning as L
import torch

from lit_meta import IMAML, MLP, Conv4
from lit_meta.cli import release_process_group
from lit_meta.datamodules import OmniglotDataModule, SinusoidDataModule

if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    task = sys.argv[3] if len(sys.argv) > 3 else "sinusoid"
    L.seed_everything(3)
    torch.set_default_dtype(torch.float64)  # compare to tight tolerance
    if task == "omniglot":
        model = IMAML(Conv4(out_features=5, hidden=8), lam=2.0, inner_steps=3, inner_lr=0.1, cg_steps=3)
        data = OmniglotDataModule(data_dir=os.path.join(os.environ["LIT_META_DATA"], "omniglot"), n_way=5, k_shot=1,
                                  k_query=2, meta_batch_size=8, steps_per_epoch=4, eval_episodes=20)
    else:
        model = IMAML(MLP(hidden=(16, 16)), lam=1.0, inner_steps=3, inner_lr=0.05, cg_steps=3)
        data = SinusoidDataModule(meta_batch_size=8, steps_per_epoch=4, k_shot=5, k_query=5)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=4,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, data)
    if trainer.global_rank == 0:
        torch.save({"initial": initial, "final": {k: v.detach().clone() for k, v in model.state_dict().items()}}, out)
    release_process_group()  # as train.py does: gloo torn down at interpreter exit aborted now and then (SIGABRT)
