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


def test_ranks_collect_shares_of_each_round_and_hold_the_single_process_buffer(tmp_path):
    from ddp_record_episodes import push_right, rollout_datamodule

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, str(HERE / "ddp_record_episodes.py"), str(tmp_path), "rollouts"], env=env,
                         cwd=tmp_path, timeout=240, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    single = rollout_datamodule()
    single.train_dataloader()  # round 0: random rollouts
    expected = {0: single.dataset("train")[(0, 0)], 1: None}
    single.aggregate(push_right)  # round 1, as the DDP run did at the start of epoch 1
    expected[1] = single.dataset("train")[(1, 0)]
    buffers = [torch.load(tmp_path / f"rank{r}_buffer.pt", weights_only=True) for r in range(2)]
    for key, value in single.buffer.state_dict()["data"].items():
        assert torch.equal(buffers[0]["data"][key], value) and torch.equal(buffers[1]["data"][key], value), key
    for epoch in range(2):
        parts = [torch.load(tmp_path / f"rank{r}_epoch{epoch}_step0.pt") for r in range(2)]
        assert parts[0].shape == (2, 4, 2) and not torch.equal(parts[0], parts[1])
        assert torch.equal(torch.cat(parts), expected[epoch].past_obs)
