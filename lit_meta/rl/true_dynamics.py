"""The true dynamics as a planning model: every candidate simulated in MuJoCo from its env's current state.

The upper-bound arm of every RL table, and the reference the model-quality diagnostics compare a
learned model with. :class:`TrueDynamics` plugs in wherever a learned dynamics learner does
(:class:`~lit_meta.rl.control.MPCController`, :func:`~lit_meta.rl.control.evaluate`): the planner calls
``dynamics(obs[B, obs_dim], action[B, act_dim])`` ``horizon`` times per iteration, rows environment-major
(``row = e * n_candidates + k``), and each call advances every row's *full* MuJoCo state (positions,
velocities, the pier's blocks, warm start) by one env step, with the env's own model, so the current
task (crippled joint, masses, slopes, pier damping) is honoured. At the first call of every iteration
(call ``i`` with ``i % horizon == 0``) the rows start again from the envs' current states.

Two exact paths, both checked against ``env.step`` by the tests:

* HalfCheetah envs (observation = ``qpos[:9] + qvel[:9]``): ``mujoco.rollout`` steps all candidates of an
  env in one C call (``frame_skip`` substeps, warm start carried), the observation is read from the state.
* any other MuJoCo env (Ant: contact forces in the observation): one ``MjData`` copy per candidate, stepped
  and observed by the env's own code (``do_simulation``, ``_get_obs``) on that data.

Example::

    >>> import gymnasium as gym, torch, lit_meta.envs
    >>> from lit_meta.rl import TrueDynamics, random_shooting
    >>> envs = gym.make_vec("lit_meta/HalfCheetahCrippledJoint-v0", num_envs=2, vectorization_mode="sync")
    >>> obs, _ = envs.reset(seed=0)
    >>> model = TrueDynamics(envs)
    >>> res = random_shooting(model.dynamics(horizon=3), envs.envs[0].unwrapped.reward_fn,
    ...                       torch.as_tensor(obs, dtype=torch.float32), horizon=3, n_candidates=8,
    ...                       action_low=-1.0, action_high=1.0, act_dim=6)
    >>> res.action.shape
    torch.Size([2, 6])
    >>> envs.close()
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import gymnasium as gym
import mujoco
import numpy as np
import torch
from mujoco import rollout as mj_rollout
from torch import Tensor

_SPEC = mujoco.mjtState.mjSTATE_FULLPHYSICS


def _sub_envs(envs) -> list:
    """The unwrapped MuJoCo envs of a sync vector env, a single env, or a sequence of envs."""
    if isinstance(envs, gym.vector.VectorEnv):
        subs = getattr(envs, "envs", None)
        if subs is None:
            raise ValueError(f"TrueDynamics needs the sub-envs in this process: got a {type(envs).__name__}; make the "
                             f"vector env with vectorization_mode='sync'")
    elif isinstance(envs, gym.Env):
        subs = [envs]
    else:
        subs = list(envs)
    out = [e.unwrapped for e in subs]
    for env in out:
        if not (hasattr(env, "model") and hasattr(env, "data") and hasattr(env, "frame_skip")):
            raise ValueError(f"TrueDynamics simulates gymnasium MuJoCo envs (model, data, frame_skip); "
                             f"{type(env).__name__} is not one")
    return out


class _EnvSim:
    """Candidates of one env: their states and one env step of them all."""

    def __init__(self, env, n_threads: int = 1) -> None:
        from lit_meta.envs.half_cheetah import NQ, NV, HalfCheetahTaskEnv

        self.env, self.model = env, env.model
        self.fast = isinstance(env, HalfCheetahTaskEnv)
        if self.fast:
            nq = self.model.nq
            # FULLPHYSICS state = [time, qpos (nq), qvel (nv), act, ...]: the cheetah's observation is a slice of it
            self.obs_index = np.r_[1:1 + NQ, 1 + nq:1 + nq + NV]
            self.scratch = [mujoco.MjData(self.model) for _ in range(n_threads)]  # one per rollout thread

    def start(self, n: int) -> None:
        """All ``n`` candidates at the env's current state."""
        data = self.env.data
        if self.fast:
            state = np.empty(mujoco.mj_stateSize(self.model, _SPEC))
            mujoco.mj_getState(self.model, data, state, _SPEC)
            self.state = np.tile(state, (n, 1))
            self.warmstart = np.tile(data.qacc_warmstart, (n, 1))
        else:
            self.datas = [copy.copy(data) for _ in range(n)]

    def step(self, action: np.ndarray) -> np.ndarray:
        """Next observations ``[n, obs_dim]`` (float64) after one env step of every candidate."""
        env = self.env
        if self.fast:
            control = np.repeat(action[:, None, :], env.frame_skip, axis=1)
            states, _ = mj_rollout.rollout(self.model, self.scratch, self.state, control,
                                           initial_warmstart=self.warmstart)
            self.state = np.ascontiguousarray(states[:, -1])
            self.warmstart = None  # only the first step of a rollout starts from the env's warm start
            return self.state[:, self.obs_index]
        obs, real = [], env.data
        try:
            for data, a in zip(self.datas, action):
                env.data = data  # the env's own stepping and observation code, on this candidate's data
                env.do_simulation(a, env.frame_skip)
                obs.append(env._get_obs())
        finally:
            env.data = real
        return np.stack(obs)


class TrueDynamics:
    """MuJoCo itself as the planner's model: candidates simulated from the envs' current full states.

    Args:
        envs: the envs being controlled: a sync ``gymnasium.vector`` env (its ``envs``), a single env, or a
            sequence of envs, each a gymnasium MuJoCo env (wrappers are looked through). Their order is the
            order of the planner's environments. ``None``: bind later with :meth:`bind` (what
            :func:`~lit_meta.rl.control.evaluate` does with its own vector env).
        n_threads: threads of ``mujoco.rollout`` per env (HalfCheetah envs; the other envs step candidates in
            Python, one thread). Default 1.

    The candidates' actions are clipped to each env's action space, as the envs clip them.
    """

    def __init__(self, envs=None, n_threads: int = 1) -> None:
        if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
            raise ValueError(f"n_threads={n_threads!r} must be an int >= 1")
        self.n_threads = n_threads
        self.sims: list[_EnvSim] = []
        if envs is not None:
            self.bind(envs)

    def bind(self, envs) -> "TrueDynamics":
        """Simulate these envs from now on (see the class arguments)."""
        self.sims = [_EnvSim(env, self.n_threads) for env in _sub_envs(envs)]
        return self

    def dynamics(self, horizon: int) -> Callable[[Tensor, Tensor], Tensor]:
        """The planner's ``dynamics(obs[B, obs_dim], action[B, act_dim]) -> next_obs``, B = n_envs * n_candidates.

        Call it once per control step, after the envs reached the state to plan from; ``horizon`` must be the
        planner's (the rows restart from the envs' states every ``horizon`` calls, i.e. every planner iteration).
        """
        if not self.sims:
            raise ValueError("TrueDynamics has no envs: pass them to TrueDynamics(envs) or call bind(envs) first")
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon={horizon!r} must be an int >= 1: the planner's horizon")
        calls = 0

        def step(obs: Tensor, action: Tensor) -> Tensor:
            nonlocal calls
            B, E = obs.shape[0], len(self.sims)
            if B % E:
                raise ValueError(f"TrueDynamics got {B} rows for {E} envs: rows must be n_envs * n_candidates, "
                                 f"environment-major (what the lit_meta planners pass)")
            n = B // E
            acts = action.detach().to("cpu", torch.float64).numpy().reshape(E, n, -1)
            if calls % horizon == 0:
                if calls == 0:  # once per control step: the planner's later iterations start from the same obs
                    _check_start(self.sims, obs.detach().to("cpu", torch.float64).numpy().reshape(E, n, -1))
                for sim in self.sims:
                    sim.start(n)
            calls += 1
            out = []
            for sim, a in zip(self.sims, acts):
                space = sim.env.action_space
                out.append(sim.step(np.clip(a, space.low, space.high)))
            return torch.as_tensor(np.concatenate(out), dtype=obs.dtype, device=obs.device)

        return step


def _check_start(sims: Sequence[_EnvSim], obs: np.ndarray) -> None:
    """The planner's start observations must be the envs' current ones (catches envs bound in the wrong order or
    planning before the envs stepped). One env may differ (an env ended by the instability guard reports its last
    finite observation); all of them differing is a misuse."""
    gaps = [float(np.abs(obs[e] - sim.env._get_obs()).max()) for e, sim in enumerate(sims)]
    if all(not gap <= 1e-3 * (1 + float(np.abs(obs[e]).max())) for e, gap in enumerate(gaps)):
        raise ValueError(f"TrueDynamics: the planner starts from observations that are not the envs' current states "
                         f"(max differences {[f'{g:.3g}' for g in gaps]}): plan right after the envs stepped, with the "
                         f"envs bound in the order of the observations")
