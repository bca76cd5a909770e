"""Rollouts of perturbed MuJoCo envs as meta-learning tasks for GrBAL/ReBAL, and as plain transitions for MB-MPC.

A task is a window of ``past_window + future_window`` consecutive transitions of one rollout and one
task of the env (Nagabandi et al. 2019: adapt on the M past, score on the K future; paper M = K = 16).
The same sampler as the few-shot episodes draws the windows: deterministic from
``(seed, split, epoch, step)``, each DDP rank taking its slice of the global meta-batch.

Data aggregation (the paper's Alg. 1/2 outer loop): :meth:`RolloutDataModule.aggregate` collects a new
round of rollouts with a given policy (the current MPC controller) and appends them. The first round
(random actions) is collected the first time a dataloader is asked for, after any checkpoint was
restored, so a resumed run does not collect again. Under DDP every rank collects its share of the
round's rollouts (rollout ``i`` on rank ``i % world_size``), the shares are gathered and every rank
appends all of them in index order: every rank holds the buffer a single process would hold.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lit_meta.episode import Transitions, Window
from lit_meta.rl.buffer import RolloutBuffer
from lit_meta.rl.collect import RolloutCollector
from lit_meta.rl.control import check_action_noise

from .episodic import EpisodicDataModule, require_positive

BATCH_TYPES = ("windows", "transitions")
VAL_ROUND = 2**32 - 1  # the collection round number of the validation rollouts (no training round uses it)


class WindowTasks:
    """Task source of windows from a :class:`RolloutBuffer` (read at call time, so it sees new rollouts)."""

    def __init__(self, buffer: RolloutBuffer, past_window: int) -> None:
        self.buffer, self.past_window = buffer, past_window

    def __call__(self, generator: torch.Generator, n_tasks: int, tasks: slice) -> Window:
        return Window(*(t[tasks] for t in self.buffer.sample_windows(n_tasks, generator, self.past_window)))


class TransitionTasks:
    """Source of plain transition batches (MB-MPC): ``n_tasks`` is the number of transitions."""

    def __init__(self, buffer: RolloutBuffer) -> None:
        self.buffer = buffer

    def __call__(self, generator: torch.Generator, n_tasks: int, tasks: slice) -> Transitions:
        return Transitions(*(t[tasks] for t in self.buffer.sample_transitions(n_tasks, generator)))


class RolloutDataModule(EpisodicDataModule):
    """Windows (or transitions) of rollouts of a perturbed env, grown by data aggregation.

    Args:
        env_id: gymnasium id of the env. Default ``"lit_meta/HalfCheetahCrippledJoint-v0"``.
        env_kwargs: extra ``gymnasium.make`` keyword arguments for both splits (``task_split`` is set here).
        past_window: M, transitions the model adapts on. Default 16 (paper).
        future_window: K, transitions the adapted model predicts. Default 16 (paper).
        batch_type: ``"windows"`` (:class:`~lit_meta.episode.Window` batches of ``meta_batch_size`` windows)
            or ``"transitions"`` (:class:`~lit_meta.episode.Transitions` of ``meta_batch_size`` transitions,
            for the non-adaptive MB-MPC baseline).
        initial_rollouts: random-action rollouts collected before training. Default 10.
        rollouts_per_round: rollouts per :meth:`aggregate` call. Default 10.
        rollout_length: steps per rollout, at most (episodes may end earlier). Default 1000.
        val_rollouts: random-action rollouts on the ``task_split="test"`` tasks whose windows make the fixed
            validation/test set (``eval_episodes`` windows). Default 4.
        n_envs: vectorised envs stepped together during collection. Default 4.
        vectorization_mode: ``"sync"`` or ``"async"`` (gymnasium.vector). Default ``"sync"``.
        capacity: transitions the buffer can hold. Default 1,000,000.
        action_noise: std of Gaussian noise added to the actions of the MPC collection rounds (action units, clipped
            to the action bounds): exploration, so that the data hold other actions than the planner's in the states
            the controller visits. Evaluation and the random rollouts are unaffected. Default 0 (the paper's).
        **kwargs: see :class:`~lit_meta.datamodules.EpisodicDataModule` (``meta_batch_size`` default 32,
            ``steps_per_epoch``, ``eval_episodes``, ``eval_meta_batch_size``, ``seed``); ``num_workers`` must
            stay 0, since worker processes would keep a stale copy of the growing buffer.
    """

    def __init__(self, env_id: str = "lit_meta/HalfCheetahCrippledJoint-v0", env_kwargs: dict[str, Any] | None = None,
                 past_window: int = 16, future_window: int = 16, batch_type: str = "windows",
                 initial_rollouts: int = 10, rollouts_per_round: int = 10, rollout_length: int = 1000,
                 val_rollouts: int = 4, n_envs: int = 4, vectorization_mode: str = "sync",
                 capacity: int = 1_000_000, steps_per_epoch: int = 100, action_noise: float = 0.0, **kwargs) -> None:
        super().__init__(steps_per_epoch=steps_per_epoch, **kwargs)
        require_positive(past_window=past_window, future_window=future_window, initial_rollouts=initial_rollouts,
                         rollouts_per_round=rollouts_per_round, rollout_length=rollout_length,
                         val_rollouts=val_rollouts, n_envs=n_envs, capacity=capacity)
        check_action_noise(action_noise, "data.init_args.action_noise")
        if batch_type not in BATCH_TYPES:
            raise ValueError(f"batch_type={batch_type!r} must be one of {BATCH_TYPES}")
        if self.num_workers:
            raise ValueError(f"num_workers={self.num_workers}: RolloutDataModule needs num_workers=0 (workers "
                             "would sample from a stale copy of the replay buffer)")
        if past_window + future_window > rollout_length:
            raise ValueError(f"past_window + future_window = {past_window + future_window} is longer than "
                             f"rollout_length={rollout_length}; shorten the windows or lengthen the rollouts")
        self.env_id, self.env_kwargs = env_id, dict(env_kwargs or {})
        self.past_window, self.future_window, self.batch_type = past_window, future_window, batch_type
        self.initial_rollouts, self.rollouts_per_round = initial_rollouts, rollouts_per_round
        self.rollout_length, self.val_rollouts = rollout_length, val_rollouts
        self.n_envs, self.vectorization_mode = n_envs, vectorization_mode
        self.action_noise = float(action_noise)
        window = past_window + future_window
        self.buffer = RolloutBuffer(capacity, window)
        self.val_buffer = RolloutBuffer(capacity, window)
        self.round = 0  # collection rounds done on the train split (round 0 = initial random rollouts)
        self._collectors: dict[str, RolloutCollector] = {}
        self.stats: dict[str, Tensor] = {}

    # -- collection ------------------------------------------------------------------------------
    def collector(self, split: str) -> RolloutCollector:
        """The vector env of the ``"train"`` or ``"test"`` task split (made on first use)."""
        if split not in self._collectors:
            self._collectors[split] = RolloutCollector(self.env_id, {**self.env_kwargs, "task_split": split},
                                                       self.n_envs, self.vectorization_mode)
        return self._collectors[split]

    def _distributed_collect(self, split: str, policy: Callable | None, round: int, n_rollouts: int):
        rank, world = self._rank_world()
        collector = self.collector(split)
        mine = [i for i in range(n_rollouts) if i % world == rank]
        rollouts = collector.collect(policy or collector.random_policy(), self.seed, round, mine, self.rollout_length)
        if world == 1:
            return rollouts
        gathered: list = [None] * world
        dist.all_gather_object(gathered, list(zip(mine, rollouts)))
        return [r for _, r in sorted((pair for share in gathered for pair in share), key=lambda p: p[0])]

    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def aggregate(self, policy: Callable[[np.ndarray], np.ndarray] | None = None, n_rollouts: int | None = None) -> None:
        """Collect one round of train-split rollouts with ``policy`` (random actions when None) and append them.

        Call it on every rank (e.g. from ``on_train_epoch_start``); afterwards the normalisation statistics
        :attr:`stats` are recomputed from the whole buffer.
        """
        n = self.initial_rollouts if self.round == 0 else (n_rollouts or self.rollouts_per_round)
        self.buffer.add(self._distributed_collect("train", policy, self.round, n))
        self.round += 1
        self.stats = self.buffer.stats()

    def _ensure_data(self) -> None:
        if self.round == 0:
            self.aggregate()
        if not len(self.val_buffer):
            self.val_buffer.add(self._distributed_collect("test", None, VAL_ROUND, self.val_rollouts))

    # -- LightningDataModule ----------------------------------------------------------------------
    def task_source(self, split: str):
        self._ensure_data()
        if split == "train":
            return (WindowTasks(self.buffer, self.past_window) if self.batch_type == "windows"
                    else TransitionTasks(self.buffer))
        return WindowTasks(self.val_buffer, self.past_window)

    def state_dict(self) -> dict:
        """Both buffers, the round counter and the statistics: tensors and ints only."""
        return {"round": self.round, "buffer": self.buffer.state_dict(), "val_buffer": self.val_buffer.state_dict(),
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.round = state["round"]
        self.buffer.load_state_dict(state["buffer"])
        self.val_buffer.load_state_dict(state["val_buffer"])
        self.stats = dict(state["stats"])

    def teardown(self, stage: str) -> None:
        for collector in self._collectors.values():
            collector.close()
        self._collectors.clear()
