"""Rollout collection on a ``gymnasium.vector`` env with any policy callable, seeded per rollout.

A policy is a callable ``policy(obs) -> actions`` on numpy arrays ``[n_envs, obs_dim] -> [n_envs,
act_dim]``; it may have ``reset(seeds)``, called with one seed per sub-env before each batch of
rollouts, so that its randomness belongs to the rollout and not to the batch it happened to run in
(this is what makes a rollout the same whichever process or vector slot collects it).

Every rollout ``i`` of collection round ``r`` gets its seeds from ``(seed, r, i)`` alone
(:func:`rollout_seeds`), so rounds can be split over DDP ranks and gathered back in index order.
Unstable physics (the lit_meta envs flag ``info["unstable"]``) and non-finite actions end the rollout
before the bad step: nothing non-finite reaches the buffer.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol, Sequence

import gymnasium as gym
import numpy as np
import torch

from lit_meta.rl.buffer import Rollout

log = logging.getLogger(__name__)


class Policy(Protocol):
    def __call__(self, obs: np.ndarray) -> np.ndarray: ...


class RandomPolicy:
    """Uniform random actions in ``[low, high]`` of an action space, one seeded stream per sub-env."""

    def __init__(self, low: np.ndarray, high: np.ndarray) -> None:
        self.low, self.high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
        self.rngs: list[np.random.Generator] = []

    def reset(self, seeds: Sequence[int]) -> None:
        self.rngs = [np.random.default_rng(seed) for seed in seeds]

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if len(self.rngs) != len(obs):
            self.reset(range(len(obs)))
        return np.stack([rng.uniform(self.low, self.high) for rng in self.rngs]).astype(np.float32)


def rollout_seeds(seed: int, round: int, index: int) -> tuple[int, int]:
    """(env reset seed, policy seed) of rollout ``index`` of collection round ``round``."""
    env_seed, policy_seed = np.random.SeedSequence([seed, round, index]).generate_state(2, dtype=np.uint32)
    return int(env_seed), int(policy_seed)


class RolloutCollector:
    """Runs whole episodes of ``env_id`` on ``n_envs`` vectorised copies and returns them as :class:`Rollout`.

    Args:
        env_id: a gymnasium id, e.g. ``"lit_meta/HalfCheetahCrippledJoint-v0"``.
        env_kwargs: keyword arguments of ``gymnasium.make`` (e.g. ``{"task_split": "train"}``).
        n_envs: environments stepped together. Default 4.
        vectorization_mode: ``"sync"`` (one process) or ``"async"`` (one worker process per env).
    """

    def __init__(self, env_id: str, env_kwargs: dict[str, Any] | None = None, n_envs: int = 4,
                 vectorization_mode: str = "sync") -> None:
        if n_envs < 1:
            raise ValueError(f"n_envs={n_envs} must be >= 1")
        if vectorization_mode not in ("sync", "async"):
            raise ValueError(f"vectorization_mode={vectorization_mode!r} must be 'sync' or 'async'")
        if env_id.startswith("lit_meta/"):
            import lit_meta.envs  # noqa: F401  (registers the lit_meta/ ids)

        self.env_id, self.env_kwargs, self.n_envs = env_id, dict(env_kwargs or {}), n_envs
        self.envs = gym.make_vec(env_id, num_envs=n_envs, vectorization_mode=vectorization_mode,
                                 **self.env_kwargs)
        self.action_low = self.envs.single_action_space.low
        self.action_high = self.envs.single_action_space.high
        self.n_unstable = 0  # rollouts ended early by unstable physics or a non-finite action, in total

    def random_policy(self) -> RandomPolicy:
        return RandomPolicy(self.action_low, self.action_high)

    def collect(self, policy: Policy | Callable[[np.ndarray], np.ndarray], seed: int, round: int,
                indices: Sequence[int], rollout_length: int, reset_options: dict | None = None) -> list[Rollout]:
        """Rollouts ``indices`` of round ``round``, each at most ``rollout_length`` steps, in ``indices`` order.
        ``reset_options``: passed to every env's ``reset`` (e.g. ``{"task": {...}}``: start on that task)."""
        rollouts: list[Rollout] = []
        for first in range(0, len(indices), self.n_envs):
            batch = list(indices[first:first + self.n_envs])
            rollouts += self._collect_batch(policy, [rollout_seeds(seed, round, i) for i in batch], rollout_length,
                                            reset_options)
        return rollouts

    def _collect_batch(self, policy, seeds: list[tuple[int, int]], rollout_length: int,
                       reset_options: dict | None = None) -> list[Rollout]:
        n = len(seeds)
        env_seeds = [s for s, _ in seeds] + [0] * (self.n_envs - n)  # unused slots run but are dropped
        obs, info = self.envs.reset(seed=env_seeds, options=reset_options)
        if hasattr(policy, "reset"):
            policy.reset([p for _, p in seeds] + [0] * (self.n_envs - n))
        steps: list[dict[str, np.ndarray]] = []
        alive = np.zeros(self.n_envs, dtype=bool)
        alive[:n] = True
        length = np.zeros(self.n_envs, dtype=np.int64)
        task = _task_vectors(info, self.n_envs)
        for _ in range(rollout_length):
            action = np.asarray(policy(obs), dtype=np.float32)
            finite = np.isfinite(action).all(axis=-1)
            next_obs, reward, terminated, truncated, info = self.envs.step(np.where(finite[:, None], action, 0.0))
            unstable = ~finite | _flag(info, "unstable", self.n_envs)
            for i in np.flatnonzero(alive & unstable):
                self.n_unstable += 1
                log.warning("rollout with env seed %d ended at step %d: %s", env_seeds[i], length[i],
                            "non-finite action from the policy" if not finite[i] else
                            _reason(info, i))
            alive &= ~unstable
            steps.append({"obs": obs, "action": action, "next_obs": next_obs, "reward": reward,
                          "terminated": terminated, "task_vector": task})
            length += alive
            alive &= ~(terminated | truncated)
            if not alive.any():
                break
            obs, task = next_obs, _task_vectors(info, self.n_envs)
        stacked = {k: np.stack([s[k] for s in steps]) for k in steps[0]}  # [time, env, ...]
        rollouts = []
        for i in range(n):
            length_i = int(length[i])
            rollouts.append(Rollout(
                *(torch.as_tensor(stacked[k][:length_i, i])
                  for k in ("obs", "action", "next_obs", "reward", "terminated", "task_vector")),
                seed=env_seeds[i]))
        return rollouts

    def close(self) -> None:
        self.envs.close()


def _flag(info: dict, key: str, n: int) -> np.ndarray:
    value = info.get(key)
    if value is None:
        return np.zeros(n, dtype=bool)
    mask = info.get(f"_{key}", np.ones(n, dtype=bool))
    return np.asarray(value, dtype=bool) & np.asarray(mask, dtype=bool)


def _reason(info: dict, i: int) -> str:
    reasons = info.get("unstable_reason")
    return str(reasons[i]) if reasons is not None else "unstable physics"


def _task_vectors(info: dict, n: int) -> np.ndarray:
    """``[n, task_dim]`` task codes from a vector env's info (``[n, 0]`` for envs without tasks)."""
    value = info.get("task_vector")
    if value is None:
        return np.zeros((n, 0))
    return np.stack([np.asarray(v, dtype=np.float64) for v in value])
