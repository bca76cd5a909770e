"""lit_meta.callbacks: short fits logged to an offline W&B run (read back from its .wandb file) and to CSV."""

from __future__ import annotations

import csv
import logging
import math

import gymnasium as gym
import lightning as L
import numpy as np
import pytest
import torch

from lit_meta import IMAML, Conv4
from lit_meta.callbacks import DynamicsMonitor, MetaLearningMonitor, RunSummary, episode_grid
from lit_meta.callbacks._common import ensure_offline_if_needed
from rl_fakes import DriftEnv
from wandb_records import offline_runs, wait_for_exit

RENDER_ENV = "lit_meta_test/RenderDrift-v0"


class RenderDrift(DriftEnv):
    """The drift env with rgb_array frames (a bar at x), for rollout videos without OpenGL."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, render_mode=None, **kwargs):
        super().__init__(**kwargs)
        self.render_mode = render_mode

    def render(self):
        frame = np.zeros((16, 32, 3), np.uint8)
        frame[:, int(np.clip(self.x + 16, 0, 31))] = 255
        return frame


if RENDER_ENV not in gym.registry:
    gym.register(RENDER_ENV, entry_point=RenderDrift)


@pytest.fixture(autouse=True)
def _wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.chdir(tmp_path)


def wandb_logger(tmp_path, name):
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(project="lit-meta-tests", name=name, offline=True, save_dir=str(tmp_path))


def finish(trainer):
    import wandb

    trainer.logger.experiment.finish()
    assert wandb.run is None
    (run_dir,) = offline_runs(trainer.logger.save_dir)
    return wait_for_exit(run_dir)


def imaml_fit(omniglot_dir, tmp_path, logger, steps=4):
    from lit_meta.datamodules import OmniglotDataModule

    L.seed_everything(0)
    data = OmniglotDataModule(data_dir=str(omniglot_dir), n_way=5, k_shot=1, k_query=3, meta_batch_size=4,
                              steps_per_epoch=100, eval_episodes=8, eval_meta_batch_size=4)
    model = IMAML(Conv4(out_features=5, hidden=8), lam=2.0, inner_steps=3, inner_lr=0.1, cg_steps=2)
    trainer = L.Trainer(max_steps=steps, val_check_interval=2, check_val_every_n_epoch=None, log_every_n_steps=1,
                        logger=logger, callbacks=[RunSummary(check_network=False), MetaLearningMonitor()],
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    return trainer


FEW_SHOT_KEYS = {"train/query_loss_step", "train/query_acc_step", "train/pre_query_loss", "train/pre_query_acc",
                 "train/pre_support_loss", "train/inner_loss_final", "train/meta_grad_norm", "train/cg_residual",
                 "train/cg_iterations", "train/proximal_distance", "train/tasks_per_s", "train/peak_mem_mb",
                 "train/lam", "val/query_acc", "val/query_acc_ci95", "val/pre_query_acc", "val/query_loss",
                 "val/pre_query_loss"}


def test_imaml_offline_wandb_run_has_scalars_media_config_and_summary(omniglot_dir, tmp_path):
    trainer = imaml_fit(omniglot_dir, tmp_path, wandb_logger(tmp_path, "imaml"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    run = finish(trainer)
    keys = run.keys()
    assert FEW_SHOT_KEYS <= keys, FEW_SHOT_KEYS - keys
    # the values are the module's: the last logged post-adaptation accuracy is what the trainer holds
    assert run.values("val/query_acc")[-1] == pytest.approx(metrics["val/query_acc"], rel=1e-6)
    assert run.values("val/pre_query_loss")[-1] == pytest.approx(metrics["val/pre_query_loss"], rel=1e-6)
    assert len(run.values("val/query_acc")) == 2  # two validation runs, no sanity check
    assert all(0 <= a <= 1 for a in run.values("train/pre_query_acc"))
    assert all(1 <= n <= 2 for n in run.values("train/cg_iterations"))
    assert all(d > 0 for d in run.values("train/proximal_distance"))
    assert all(v == 2.0 for v in run.values("train/lam"))
    assert all(t > 0 for t in run.values("train/tasks_per_s")) and run.values("train/peak_mem_mb")[-1] > 10
    # media: one episode grid and one inner-loss line plot per validation run, files on disk
    images = run.values("media/val_episode.path")
    assert len(images) == 2 and all((run.dir / "files" / p).is_file() and p.endswith(".png") for p in images)
    assert "after" in run.values("media/val_episode.caption")[0]
    tables = run.values("media/inner_loss_curve_table.path")
    assert len(tables) == 2
    import json

    curve = json.loads((run.dir / "files" / tables[0]).read_text())
    assert curve["columns"] == ["inner_step", "inner_loss"] and len(curve["data"]) == 4  # 3 steps + 1
    assert curve["data"][-1][1] < curve["data"][0][1]  # the inner solve lowers the proximal objective
    assert any(k.startswith("_wandb.visualize") and "media/inner_loss_curve" in k for k in run.config)  # a line plot
    # run config: hyperparameters and the code version; summary table and final values
    assert run.config["lam"] == 2.0 and "lit_meta_version" in run.config
    assert "summary/fit.path" in keys
    assert run.summary["final/val/query_acc"] == pytest.approx(metrics["val/query_acc"], rel=1e-6)


def test_csv_logger_gets_the_scalars_and_media_are_skipped_with_one_notice(omniglot_dir, tmp_path, caplog):
    from lightning.pytorch.loggers import CSVLogger

    caplog.set_level(logging.INFO, logger="lit_meta.callbacks")
    trainer = imaml_fit(omniglot_dir, tmp_path, CSVLogger(tmp_path, name="csv"))
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert FEW_SHOT_KEYS <= columns, FEW_SHOT_KEYS - columns
    val = [float(r["val/query_acc"]) for r in rows if r["val/query_acc"]]
    assert val[-1] == pytest.approx(float(trainer.callback_metrics["val/query_acc"]), rel=1e-6)
    notices = [r for r in caplog.records if "media" in r.getMessage() and "skipped" in r.getMessage()]
    assert len(notices) == 1 and "CSVLogger" in notices[0].getMessage()
    assert not offline_runs(tmp_path)


def test_grbal_offline_run_has_rollout_returns_planner_cost_and_a_video(tmp_path):
    from lit_meta.datamodules.rollouts import RolloutDataModule
    from lit_meta.nets import MLP
    from lit_meta.rl.learners import GrBAL

    L.seed_everything(0)
    data = RolloutDataModule(env_id=RENDER_ENV, env_kwargs={"change_every": 25}, past_window=4, future_window=4,
                             initial_rollouts=4, rollouts_per_round=2, rollout_length=30, val_rollouts=2, n_envs=2,
                             meta_batch_size=8, steps_per_epoch=5, eval_episodes=8, eval_meta_batch_size=8, seed=3)
    mpc = {"planner": "random_shooting", "horizon": 2, "n_candidates": 16}
    model = GrBAL(MLP(1, 2, (16,)), inner_steps=1, inner_lr=0.5, obs_dim=2, action_dim=1, exclude_obs_dims=[0, 1],
                  aggregate_every_n_epochs=1, mpc=mpc)
    monitor = DynamicsMonitor(eval_every_n_epochs=2, eval_episodes=2, eval_episode_length=12,
                              eval_splits=["train", "test"], video_every_n_epochs=2, video_length=8)
    trainer = L.Trainer(max_epochs=2, log_every_n_steps=1, logger=wandb_logger(tmp_path, "grbal"),
                        callbacks=[RunSummary(check_network=False), monitor], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert model.training  # evaluation put it back
    run = finish(trainer)
    keys = run.keys()
    expected = {"train/query_loss_step", "train/meta_grad_norm", "val/pre_query_loss", "val/query_loss",
                "rollout/planner_ms_per_step", "rollout/n_nonfinite", "model/open_loop_err_1", "model/open_loop_err_h",
                "model/return_err", "model/return_bias", "rollout/train_env_steps"}
    for split in ("train", "test"):
        expected |= {f"rollout/{split}_{k}" for k in ("mean_return", "return_ci95", "pred_error_pre",
                                                      "pred_error_post", "planner_ms_per_step", "n_nonfinite")}
        expected.add(f"rollout/{split}_returns.path")
    assert expected <= keys, expected - keys
    assert len(run.values("model/open_loop_err_h")) == 2 and run.values("model/open_loop_err_h")[-1] >= 0
    assert run.values("rollout/planner_ms_per_step")[-1] > 0 and run.values("rollout/n_nonfinite") == [0.0]
    assert run.values("rollout/test_mean_return")[-1] == pytest.approx(metrics["rollout/test_mean_return"], rel=1e-6)
    assert run.values("val/query_loss")[-1] == pytest.approx(metrics["val/query_loss"], rel=1e-6)
    (video,) = run.values("rollout/video.path")
    path = run.dir / "files" / video
    assert path.suffix == ".gif" and path.is_file()
    from PIL import Image

    with Image.open(path) as gif:
        assert gif.n_frames == 9 and gif.size == (32, 16)
    assert run.summary["final/rollout/test_mean_return"] == pytest.approx(metrics["rollout/test_mean_return"])


def test_no_api_key_goes_offline_and_an_explicit_mode_is_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert ensure_offline_if_needed(check_network=False) == "no W&B API key"
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert ensure_offline_if_needed() is None and os.environ["WANDB_MODE"] == "disabled"


def test_episode_grid_marks_errors():
    x = torch.rand(5, 1, 28, 28)
    y = torch.arange(5)
    image = episode_grid(x, y, y, x, y, torch.tensor([0, 1, 2, 3, 0]), scale=1)
    cell = 28 + 6
    assert image.size == (5 * cell, 2 * (cell + 12) + 6)
    wrong = image.getpixel((4 * cell, cell + 12 + 6 + 1))  # the last query image's frame
    right = image.getpixel((0, cell + 12 + 6 + 1))
    assert wrong == (255, 0, 0) and right == (0, 128, 0)
