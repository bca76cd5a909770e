"""What a model-based meta-RL researcher wants to see (GrBAL, ImplicitGrBAL, ReBAL, MB-MPC).

The learners log the model's K-step prediction error on held-out-task windows without and with adaptation
(``val/pre_query_loss``, ``val/query_loss``). This callback adds the planner's cost and NaN-candidate count of
each data-aggregation round, episode returns of MPC with online adaptation (``lit_meta.rl.control.evaluate``,
per split, every n epochs; costly, so off by default) and rollout videos (W&B only).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

from ._common import log, log_scalars, wandb_run

# Rendering MuJoCo without a display: EGL unless the user chose a backend (read when mujoco first renders).
os.environ.setdefault("MUJOCO_GL", "egl")


class DynamicsMonitor(Callback):
    """Rollout metrics and videos of a dynamics learner; reads the learner and runs episodes with it in eval mode
    (restored afterwards), never changes its weights or the data.

    Scalars (``pl_module.log``, any logger), at the end of a training epoch (the learner itself logs
    ``rollout/planner_ms_per_step`` and ``rollout/n_nonfinite`` of each data-aggregation round):
        Every ``eval_every_n_epochs`` epochs, for each split in ``eval_splits``:
        ``rollout/{split}_mean_return``, ``rollout/{split}_return_ci95``, ``rollout/{split}_pred_error_pre``,
        ``rollout/{split}_pred_error_post`` (K-step error on the episodes' windows without / with adaptation),
        ``rollout/{split}_planner_ms_per_step``, ``rollout/{split}_n_nonfinite``, and
        ``rollout/train_env_steps`` (transitions in the training buffer: the x axis of a sample-efficiency curve).
        Every ``open_loop_every_n_epochs`` epochs (cheap: one batched model rollout, no simulation): open-loop
        prediction quality on the DataModule's held-out-task validation rollouts
        (:func:`lit_meta.rl.diagnostics.open_loop_errors`, the planner's horizon H, adapted on the M
        transitions before each start; MB-MPC adapts nothing): ``model/open_loop_err_1``, ``model/open_loop_err_h`` (mean squared observation error
        after 1 and H steps, units of the data's std), ``model/return_err``, ``model/return_bias`` (H-step
        return predicted - true).
    Media (W&B only, global rank 0): ``rollout/{split}_returns`` (table: episode, return) with each evaluation;
    ``rollout/video`` every ``video_every_n_epochs`` epochs: one ``video_split`` episode of MPC with online
    adaptation, rendered headless (``MUJOCO_GL=egl`` by default) into a GIF (Pillow).

    Args:
        eval_every_n_epochs: evaluation episodes every n epochs (at epochs n-1, 2n-1, ...); 0: never. Default 0.
        eval_episodes: episodes per split. Default 2. eval_episode_length: steps per episode. Default 200.
        eval_splits: task splits evaluated. Default ("test",) (held-out tasks); add "train".
        eval_n_envs: environments stepped together. Default 2.
        video_every_n_epochs: a rollout video every n epochs; 0: never. Default 0.
        video_length: env steps in the video. Default 200. video_split: its task split. Default "test".
        video_fps: GIF frames per second. Default 20. video_width: frames resized to this width. Default 240.
        seed: seed of the evaluation episodes. Default 12345.
        open_loop_every_n_epochs: open-loop diagnostics every n epochs; 0: never. Default 1.
    """

    def __init__(self, eval_every_n_epochs: int = 0, eval_episodes: int = 2, eval_episode_length: int = 200,
                 eval_splits: Sequence[str] = ("test",), eval_n_envs: int = 2, video_every_n_epochs: int = 0,
                 video_length: int = 200, video_split: str = "test", video_fps: int = 20, video_width: int = 240,
                 seed: int = 12345, open_loop_every_n_epochs: int = 1) -> None:
        if eval_every_n_epochs < 0 or video_every_n_epochs < 0 or open_loop_every_n_epochs < 0:
            raise ValueError("eval_every_n_epochs, video_every_n_epochs and open_loop_every_n_epochs must be >= 0 "
                             "(0: never)")
        self.open_loop_every_n_epochs = open_loop_every_n_epochs
        self._reward_fn: Any = None
        self.eval_every_n_epochs, self.eval_episodes, self.eval_episode_length = eval_every_n_epochs, eval_episodes, eval_episode_length
        self.eval_splits, self.eval_n_envs = list(eval_splits), eval_n_envs
        self.video_every_n_epochs, self.video_length, self.video_split = video_every_n_epochs, video_length, video_split
        self.video_fps, self.video_width, self.seed = video_fps, video_width, seed
        self._video_failed = False

    @staticmethod
    def _due(n: int, trainer: L.Trainer) -> bool:
        return bool(n) and (trainer.current_epoch + 1) % n == 0 and not trainer.sanity_checking \
            and not getattr(trainer, "fast_dev_run", False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = getattr(trainer, "datamodule", None)
        if not hasattr(data, "env_id"):
            return
        if self._due(self.open_loop_every_n_epochs, trainer) and len(getattr(data, "val_buffer", ())):
            log_scalars(pl_module, self._open_loop(pl_module, data), batch_size=1)
        if self._due(self.eval_every_n_epochs, trainer):
            run = wandb_run(trainer)
            for split in self.eval_splits:
                result = self._evaluate(pl_module, data, split)
                log_scalars(pl_module, {"rollout/train_env_steps": float(len(getattr(data, "buffer", ()))),
                                        f"rollout/{split}_mean_return": result["mean_return"],
                                        f"rollout/{split}_return_ci95": result["ci95"],
                                        f"rollout/{split}_pred_error_pre": result["pred_error_pre"],
                                        f"rollout/{split}_pred_error_post": result["pred_error_post"],
                                        f"rollout/{split}_planner_ms_per_step": result.get("planner_ms_per_step", math.nan),
                                        f"rollout/{split}_n_nonfinite": result["n_nonfinite"]}, batch_size=1)
                if run is not None:
                    import wandb

                    table = wandb.Table(columns=["episode", "return"],
                                        data=[[i, r] for i, r in enumerate(result["returns"])])
                    run.log({f"rollout/{split}_returns": table, "trainer/global_step": trainer.global_step})
        if self._due(self.video_every_n_epochs, trainer) and not self._video_failed:
            run = wandb_run(trainer)
            if run is not None:
                self._log_video(run, trainer, pl_module, data)

    def _mpc(self, pl_module: L.LightningModule) -> dict[str, Any]:
        return {k: v for k, v in dict(getattr(pl_module, "mpc", {}) or {}).items()
                if k in ("planner", "horizon", "n_candidates", "planner_kwargs")}

    def _open_loop(self, pl_module: L.LightningModule, data: Any) -> dict[str, float]:
        import torch

        from lit_meta.rl.control import env_reward_fns
        from lit_meta.rl.diagnostics import open_loop_errors

        if self._reward_fn is None:  # made once: env_reward_fns builds an env
            self._reward_fn, _ = env_reward_fns(data.env_id, {**(getattr(data, "env_kwargs", None) or {}),
                                                             "task_split": "test"})
        was_training = pl_module.training
        pl_module.eval()
        try:
            segments = [s._replace(**{k: getattr(s, k).to(pl_module.device) for k in ("obs", "action", "next_obs")})
                        for s in data.val_buffer.segments()]
            with torch.inference_mode(False):
                out = open_loop_errors(pl_module, segments, self._reward_fn, horizon=self._mpc(pl_module).get("horizon", 10),
                                       past_window=data.past_window, stride=10)
        finally:
            pl_module.train(was_training)
        return {"model/open_loop_err_1": out["err_1"], "model/open_loop_err_h": out["err_h"],
                "model/return_err": out["return_err"], "model/return_bias": out["return_bias"]}

    def _evaluate(self, pl_module: L.LightningModule, data: Any, split: str) -> dict[str, Any]:
        from lit_meta.rl.control import evaluate

        was_training = pl_module.training
        try:
            return evaluate(pl_module, data.env_id, split, episodes=self.eval_episodes,
                            episode_length=self.eval_episode_length, env_kwargs=getattr(data, "env_kwargs", None),
                            n_envs=min(self.eval_n_envs, self.eval_episodes), past_window=data.past_window,
                            future_window=data.future_window, seed=self.seed, **self._mpc(pl_module))
        finally:
            pl_module.train(was_training)

    def _log_video(self, run: Any, trainer: L.Trainer, pl_module: L.LightningModule, data: Any) -> None:
        import wandb

        was_training = pl_module.training
        try:
            frames, episode_return = self.render_episode(pl_module, data)
        except Exception as error:  # no OpenGL backend, an env without rgb_array rendering, ...
            self._video_failed = True
            log.warning("lit_meta.callbacks: rollout videos are off for this run: rendering %s failed (%s: %s); "
                        "set MUJOCO_GL=egl or osmesa (scripts/install_render.sh)", data.env_id, type(error).__name__, error)
            return
        finally:
            pl_module.train(was_training)
        folder = Path(tempfile.mkdtemp(prefix="lit_meta_video_"))
        path = folder / f"rollout_epoch{trainer.current_epoch}.gif"
        write_gif(frames, path, self.video_fps)
        run.log({"rollout/video": wandb.Video(str(path), format="gif",
                                              caption=f"epoch {trainer.current_epoch}, {self.video_split} task, "
                                                      f"MPC with online adaptation, return {episode_return:.1f}"),
                 "trainer/global_step": trainer.global_step})

    def render_episode(self, pl_module: L.LightningModule, data: Any) -> tuple[list[np.ndarray], float]:
        """One episode of MPC with online adaptation on a ``video_split`` task, as rgb frames, and its return."""
        import gymnasium as gym

        from lit_meta.rl.control import MPCController, env_reward_fns

        pl_module.eval()
        kwargs = {**(getattr(data, "env_kwargs", None) or {}), "task_split": self.video_split}
        reward_fn, termination_fn = env_reward_fns(data.env_id, kwargs)
        env = gym.make(data.env_id, render_mode="rgb_array", **kwargs)
        try:
            controller = MPCController(pl_module, reward_fn, termination_fn, env.action_space.low,
                                       env.action_space.high, past_window=data.past_window, seed=self.seed,
                                       **self._mpc(pl_module))
            obs, _ = env.reset(seed=self.seed)
            frames, total = [self._frame(env.render())], 0.0
            for _ in range(self.video_length):
                action = controller(np.asarray(obs, dtype=np.float32)[None])[0]
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                frames.append(self._frame(env.render()))
                if terminated or truncated:
                    break
        finally:
            env.close()
        return frames, total

    def _frame(self, frame: Any) -> np.ndarray:
        if frame is None:
            raise RuntimeError("env.render() returned None (no rgb_array render mode)")
        frame = np.asarray(frame, dtype=np.uint8)
        if self.video_width and frame.shape[1] > self.video_width:
            from PIL import Image

            height = max(1, round(frame.shape[0] * self.video_width / frame.shape[1]))
            frame = np.asarray(Image.fromarray(frame).resize((self.video_width, height), Image.BILINEAR))
        return frame


def write_gif(frames: list[np.ndarray], path: Path, fps: int = 20) -> Path:
    """Frames ``[H, W, 3]`` uint8 -> an animated GIF (Pillow), looping."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
    return path
