"""A tiny task env for the rollout tests: exact, cheap dynamics whose transitions can be checked by hand.

State x (float), action a in [-1, 1], task c: x' = x + a + c. Observation [x, step]. The task c is drawn
from the env's RNG at reset (train: {0, 3}, test: {2}, held out) and redrawn every ``change_every`` steps;
``info["task_vector"] = [c]``. An action above 0.99 makes the "physics" blow up: the env answers like
the lit_meta envs (last finite obs, reward 0, truncated, ``info["unstable"]``).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

ENV_ID = "lit_meta_test/Drift-v0"


class DriftEnv(gym.Env):
    def __init__(self, task_split: str = "train", change_every: int | None = None, max_steps: int = 50,
                 blow_up_above: float = 2.0) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.tasks = [0.0, 3.0] if task_split == "train" else [2.0]
        self.change_every, self.max_steps, self.blow_up_above = change_every, max_steps, blow_up_above

    @staticmethod
    def reward_fn(obs, action, next_obs):
        return -next_obs[..., 0].abs()

    def _info(self) -> dict:
        return {"task": {"c": self.c}, "task_vector": np.array([self.c])}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x, self.t = float(self.np_random.normal()), 0
        self.c = float(self.np_random.choice(self.tasks))
        return np.array([self.x, self.t], dtype=np.float64), self._info()

    def step(self, action):
        a = float(np.asarray(action).reshape(-1)[0])
        if not np.isfinite(a) or a > self.blow_up_above:
            info = {**self._info(), "unstable": True, "unstable_reason": "test blow-up"}
            return np.array([self.x, self.t], dtype=np.float64), 0.0, False, True, info
        self.x += a + self.c
        self.t += 1
        if self.change_every and self.t % self.change_every == 0:
            self.c = float(self.np_random.choice(self.tasks))
        obs = np.array([self.x, self.t], dtype=np.float64)
        return obs, -abs(self.x), False, self.t >= self.max_steps, self._info()


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=DriftEnv)
