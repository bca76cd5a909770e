"""Under real 2-process DDP, each rank gets its own tasks and together they are the 1-process meta-batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from lit_meta.datamodules import SinusoidDataModule

HERE = Path(__file__).resolve().parent


def test_ranks_split_the_single_process_meta_batch(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, str(HERE / "ddp_record_episodes.py"), str(tmp_path)], env=env,
                         cwd=tmp_path, timeout=240, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    single = SinusoidDataModule(meta_batch_size=4, steps_per_epoch=2, k_shot=3, k_query=3, seed=5).dataset("train")
    for epoch in range(2):
        for step in range(2):
            parts = [torch.load(tmp_path / f"rank{r}_epoch{epoch}_step{step}.pt") for r in range(2)]
            assert parts[0].shape == (2, 3, 1)
            assert not torch.equal(parts[0], parts[1])
            assert torch.equal(torch.cat(parts), single[(epoch, step)].support_x)
