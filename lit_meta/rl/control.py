"""Online adaptation + MPC (Nagabandi et al. 2019, Alg. 2) and the evaluation of a dynamics learner.

At every environment step the controller (1) adapts the model on the last ``past_window`` transitions of
the current episode (GrBAL: the inner update from the meta-learned weights; ReBAL: the hidden-state
update; MB-MPC: nothing), (2) plans with the adapted model (random shooting, CEM or MPPI from
:mod:`lit_meta.rl.planners`), (3) returns the first action. All environments of a vector env are
adapted and planned for together: per-environment adapted weights carry a leading environment
dimension, and the planner's candidate rows are environment-major, so one model call per horizon step
serves them all.
"""

from __future__ import annotations

import difflib
import inspect
import math
import time
from typing import Any, Callable, Literal, Mapping, Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from lit_meta.episode import Window
from lit_meta.functional import mse_loss, per_task_loss
from lit_meta.rl import planners
from lit_meta.rl.buffer import Rollout, RolloutBuffer
from lit_meta.rl.collect import RolloutCollector
from lit_meta.rl.true_dynamics import TrueDynamics

PLANNERS = ("random_shooting", "cem", "mppi")
# planner arguments MPCController passes itself on every call: not planner_kwargs
_PER_CALL = ("horizon", "n_candidates", "action_low", "action_high", "generator", "termination_fn")
# MPCController arguments its builder supplies (DynamicsLearner.policy, evaluate): not settings of a learner's mpc
_SUPPLIED = {"learner": "the learner itself", "reward_fn": "the env (env_reward_fns)",
             "termination_fn": "the env (env_reward_fns)", "action_low": "the env's action space",
             "action_high": "the env's action space", "past_window": "the DataModule (data.init_args.past_window)",
             "action_noise": "the DataModule (data.init_args.action_noise: exploration in the collection rounds only)"}


def env_reward_fns(env_id: str, env_kwargs: dict[str, Any] | None = None) -> tuple[Callable, Callable | None]:
    """(reward_fn, termination_fn) of an env: the batched torch functions the planner scores with."""
    if env_id.startswith("lit_meta/"):
        import lit_meta.envs  # noqa: F401
    env = gym.make(env_id, **(env_kwargs or {}))
    try:
        reward_fn = getattr(env.unwrapped, "reward_fn", None)
        termination_fn = getattr(env.unwrapped, "termination_fn", None)
    finally:
        env.close()
    if reward_fn is None:
        raise ValueError(
            f"{env_id} has no reward_fn: MPC scores candidate plans with the env's reward, so its unwrapped env must "
            f"provide reward_fn(obs, action, next_obs) -> Tensor (batched torch, equal to the env's reward), "
            f"optionally termination_fn(obs, action, next_obs) -> BoolTensor"
        )
    return reward_fn, termination_fn


def _did_you_mean(key: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_settings(adapt: bool, planner: str, horizon: int, n_candidates: int,
                    planner_kwargs: Mapping[str, Any] | None, seed: int, where: str) -> None:
    """Check :class:`MPCController`'s settings before any step; ValueError naming the setting, its value, the
    allowed names or range and ``where`` to fix it. Ranges are the planners' own checks
    (:mod:`lit_meta.rl.planners`), with their defaults for the planner arguments not given; tensor arguments
    (``init_std``, ``noise_std``, ``init_mean``) are checked when planning (their shapes need the envs)."""
    def fail(message: str) -> ValueError:
        return ValueError(f"{message}; fix it in {where}")

    if not isinstance(adapt, (bool, np.bool_)):
        raise fail(f"adapt={adapt!r}: must be True or False (False: plan with the meta-learned weights)")
    if planner not in PLANNERS:
        raise fail(f"planner={planner!r} is not one of {PLANNERS}")
    if planner_kwargs is not None and not isinstance(planner_kwargs, Mapping):
        raise fail(f"planner_kwargs={planner_kwargs!r}: must be a dict of {planner} arguments (or None)")
    kwargs = dict(planner_kwargs or {})
    params = inspect.signature(getattr(planners, planner)).parameters
    own = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in _PER_CALL]
    for key, value in kwargs.items():
        if key in _PER_CALL:
            instead = f": set mpc.{key} instead" if key in ("horizon", "n_candidates") else " (from the env): remove it"
            raise fail(f"planner_kwargs {key!r} (= {value!r}) is set by the controller{instead}")
        if key not in own:
            raise fail(f"planner_kwargs {key!r} (= {value!r}) is not an argument of the {planner} planner; its "
                       f"arguments are {', '.join(own)}{_did_you_mean(key, own)}")
    settings = {**{n: params[n].default for n in own}, **kwargs}
    try:
        planners._check_int("seed", seed, 0, "the planner's generator takes a seed >= 0")
        planners._check_sizes(horizon, n_candidates)
        if planner == "cem":
            planners._check_cem_settings(n_candidates, settings["iterations"], settings["n_elites"], settings["alpha"])
        elif planner == "mppi":
            planners._check_mppi_settings(settings["temperature"], settings["iterations"])
    except ValueError as err:
        raise fail(str(err)) from None


def check_action_noise(action_noise: float, where: str) -> None:
    """``action_noise`` (std of the exploration noise, action units) is a finite number >= 0, or a ValueError."""
    if (isinstance(action_noise, bool) or not isinstance(action_noise, (int, float))
            or not math.isfinite(action_noise) or action_noise < 0):
        raise ValueError(f"action_noise={action_noise!r}: must be a finite number >= 0 (the std of the Gaussian "
                         f"noise added to the actions, in action units; 0: none); fix it in {where}")


def mpc_settings() -> dict[str, Any]:
    """The :class:`MPCController` arguments a dynamics learner's ``mpc`` dict may set, with their defaults
    (the others come from the learner, the env and the DataModule)."""
    return {n: p.default for n, p in inspect.signature(MPCController).parameters.items() if n not in _SUPPLIED}


def check_mpc(mpc: Mapping[str, Any] | None, where: str = "model.init_args.mpc") -> None:
    """Check a dynamics learner's ``mpc`` (keyword arguments of :class:`MPCController`) when the learner is
    built, not after the random rollouts and an epoch: every key is a setting (:func:`mpc_settings`), the
    planner is one of :data:`PLANNERS`, every ``planner_kwargs`` key is an argument of that planner, and the
    values are in the planners' ranges. Raises ValueError naming the key, its value, the allowed names or
    range and ``where`` to fix it (default ``model.init_args.mpc``, the place in a LightningCLI config)."""
    if mpc is None:
        return
    settings = mpc_settings()
    if not isinstance(mpc, Mapping):
        raise ValueError(f"mpc={mpc!r}: must be a dict of MPCController arguments ({', '.join(settings)}) or None; "
                         f"fix it in {where}")
    for key, value in mpc.items():
        if key in _SUPPLIED:
            raise ValueError(f"mpc key {key!r} (= {value!r}) is not a setting: the controller takes it from "
                             f"{_SUPPLIED[key]}; remove it from {where}")
        if key not in settings:
            raise ValueError(f"mpc key {key!r} (= {value!r}) is not an argument of MPCController; the keys are "
                             f"{', '.join(settings)}{_did_you_mean(key, settings)}; fix it in {where}")
    given = {**settings, **mpc}
    _check_settings(given["adapt"], given["planner"], given["horizon"], given["n_candidates"],
                    given["planner_kwargs"], given["seed"], where)


def adapted_params(learner, n: int, past_obs: Tensor | None = None, past_action: Tensor | None = None,
                   past_next_obs: Tensor | None = None) -> dict[str, Tensor]:
    """The per-row state ``[n, ...]`` of a dynamics learner adapted on ``n`` sets of past transitions ``[n, M, ...]``
    (Nagabandi et al. 2019, Alg. 2 line 5: GrBAL's adapted weights, ReBAL's hidden state), detached; the learner's
    state before adaptation (``learner.unadapted(n)``) when ``past_obs`` is None."""
    if past_obs is None:
        return learner.unadapted(n)
    norm = learner.normalizer
    with torch.enable_grad():
        params = learner.adapt(norm.inputs(past_obs, past_action), norm.targets(past_obs, past_next_obs))
    return {k: v.detach() for k, v in params.items()}


def model_dynamics(learner, params: dict[str, Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """The planner's ``dynamics(obs[B, obs_dim], action[B, act_dim]) -> next_obs`` of a learner with per-row-group
    weights ``params [E, ...]``: rows are environment-major, so they fold into ``[E, B / E, ...]``."""
    norm, n_envs = learner.normalizer, next(iter(params.values())).shape[0]

    def step(obs: Tensor, action: Tensor) -> Tensor:
        output = learner.predict(params, norm.inputs(obs, action).view(n_envs, -1, norm.in_features))
        return norm.next_obs(obs, output.reshape(obs.shape))

    return step


class MPCController:
    """A policy ``controller(obs [E, obs_dim]) -> actions [E, act_dim]`` that adapts, then plans.

    Args:
        learner: a trained dynamics learner (:class:`~lit_meta.rl.learners.GrBAL`, ``ImplicitGrBAL``,
            ``ReBAL``, ``MBMPC``): it provides ``normalizer``, ``adapt`` and ``predict``; or a
            :class:`~lit_meta.rl.true_dynamics.TrueDynamics` bound to the envs being controlled (the
            true-dynamics planner: candidates simulated in MuJoCo; nothing to adapt).
        reward_fn, termination_fn: the env's batched torch reward/termination (:func:`env_reward_fns`).
        action_low, action_high: action bounds ``[act_dim]``.
        past_window: M, transitions adapted on (paper 16). Default 16.
        adapt: adapt online (False: plan with the meta-learned weights, for the "without adaptation" arm).
        planner: ``"random_shooting"`` (paper), ``"cem"`` or ``"mppi"``. horizon: H (paper 10).
        n_candidates: sequences per step (paper 500). planner_kwargs: extra planner arguments (e.g.
            ``iterations``, ``n_elites``, ``temperature``).
        seed: seed of the planner's generator (reset per batch of rollouts from the rollouts' seeds), >= 0.
        action_noise: std of Gaussian noise added to every action taken (action units, then clipped to the bounds;
            the noisy action is what adaptation sees), from a generator of its own: exploration for the data
            collection rounds (``RolloutDataModule(action_noise=...)``). Default 0: the planned action.

    The settings (``adapt`` ... ``seed``) are checked here, before any step (:func:`check_mpc`).
    """

    def __init__(self, learner, reward_fn: Callable, termination_fn: Callable | None, action_low: Sequence[float],
                 action_high: Sequence[float], past_window: int = 16, adapt: bool = True,
                 planner: Literal["random_shooting", "cem", "mppi"] = "random_shooting", horizon: int = 10,
                 n_candidates: int = 500, planner_kwargs: dict[str, Any] | None = None, seed: int = 0,
                 action_noise: float = 0.0) -> None:
        _check_settings(adapt, planner, horizon, n_candidates, planner_kwargs, seed, "the MPCController arguments")
        if past_window < 1:
            raise ValueError(f"past_window={past_window} must be >= 1")
        check_action_noise(action_noise, "the MPCController arguments")
        self.learner, self.reward_fn, self.termination_fn = learner, reward_fn, termination_fn
        self.true_dynamics = isinstance(learner, TrueDynamics)
        self.device = torch.device("cpu") if self.true_dynamics else next(learner.parameters()).device
        self.low = torch.as_tensor(np.asarray(action_low), dtype=torch.float32, device=self.device)
        self.high = torch.as_tensor(np.asarray(action_high), dtype=torch.float32, device=self.device)
        self.past_window, self.adapt_online, self.planner = past_window, adapt, getattr(planners, planner)
        self.horizon, self.n_candidates = horizon, n_candidates
        self.planner_kwargs = dict(planner_kwargs or {})
        self.warm_start = planner in ("cem", "mppi")
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.action_noise = float(action_noise)
        self.noise_generator = torch.Generator(device=self.device).manual_seed(seed)
        self.n_nonfinite = 0  # candidates discarded for non-finite predictions, in total
        self.plan_seconds, self.plan_calls = 0.0, 0  # wall time of adaptation + planning, in total, and calls
        self.reset([seed])

    def reset(self, seeds: Sequence[int]) -> None:
        """Start new episodes: forget the transitions and the warm start; reseed the planner and the action noise."""
        planner_seed, noise_seed = np.random.SeedSequence(list(seeds)).generate_state(2)
        self.generator.manual_seed(int(planner_seed))
        self.noise_generator.manual_seed(int(noise_seed))
        self.history: list[tuple[Tensor, Tensor]] = []  # (obs, action) of the steps taken, [E, ...] each
        self.plan: Tensor | None = None

    def adapted_params(self, obs: Tensor) -> dict[str, Tensor]:
        """Per-environment weights ``[E, ...]`` adapted on the last M transitions (meta-learned ones before any)."""
        if not self.adapt_online or not self.history:
            return adapted_params(self.learner, len(obs))
        past = self.history[-self.past_window:]
        past_obs = torch.stack([o for o, _ in past], 1)
        past_next = torch.cat([past_obs[:, 1:], obs[:, None]], 1)
        return adapted_params(self.learner, len(obs), past_obs, torch.stack([a for _, a in past], 1), past_next)

    def record(self, obs: Tensor, action: Tensor) -> None:
        """Remember a step taken (``[E, ...]`` each): the last ``past_window`` are what adaptation uses."""
        self.history.append((obs, action))
        del self.history[:-self.past_window]

    def dynamics(self, params: dict[str, Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        """The planner's model with these per-environment weights (:func:`model_dynamics`)."""
        return model_dynamics(self.learner, params)

    @torch.no_grad()
    def __call__(self, obs: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        obs_t = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device)
        if self.history and len(self.history[-1][0]) != len(obs_t):
            self.reset([0])
        dynamics = (self.learner.dynamics(self.horizon) if self.true_dynamics
                    else self.dynamics(self.adapted_params(obs_t)))
        kwargs = dict(self.planner_kwargs)
        if self.warm_start and self.plan is not None:
            kwargs["init_mean"] = planners.shift_plan(self.plan, self.low, self.high)
        result = self.planner(dynamics, self.reward_fn, obs_t, horizon=self.horizon,
                              n_candidates=self.n_candidates, action_low=self.low, action_high=self.high,
                              generator=self.generator, termination_fn=self.termination_fn, **kwargs)
        self.n_nonfinite += int(result.n_nonfinite.sum())
        self.plan = result.plan
        action_t = result.action
        if self.action_noise:  # exploration: the env and adaptation get the noisy action, the warm start the plan
            noise = torch.randn(action_t.shape, generator=self.noise_generator, device=self.device)
            action_t = torch.minimum(torch.maximum(action_t + self.action_noise * noise, self.low), self.high)
        self.record(obs_t, action_t)
        action = action_t.cpu().numpy()
        self.plan_seconds += time.perf_counter() - start
        self.plan_calls += 1
        return action

    @property
    def ms_per_step(self) -> float:
        """Mean wall time of one call (adapt + plan for all environments), in milliseconds; NaN before any."""
        return 1000.0 * self.plan_seconds / self.plan_calls if self.plan_calls else math.nan


def prediction_errors(learner, rollouts: list[Rollout], past_window: int, future_window: int,
                      chunk_size: int = 64) -> dict[str, float]:
    """Mean K-step (one step ahead) prediction error of the normalised state change on every window of the
    rollouts, without and with adaptation on the window's M past transitions. Windows are adapted
    ``chunk_size`` at a time (each adapted window holds a copy of the parameters: 64 x the 3 x 512 MLP is
    ~140 MB)."""
    buffer = RolloutBuffer(capacity=max(sum(r.length for r in rollouts), 1), window=past_window + future_window)
    buffer.add(rollouts)
    if not buffer.n_windows:
        return {"pred_error_pre": math.nan, "pred_error_post": math.nan}
    totals = torch.zeros(2, dtype=torch.float64)
    for starts in buffer.starts.split(chunk_size):
        window = Window(*(t.to(learner.device) for t in buffer.windows(starts, past_window)))
        episode = learner.normalizer.episode(window)
        theta = learner.unadapted(episode.n_tasks)
        with torch.enable_grad():
            phi = {k: v.detach() for k, v in learner.adapt(episode.support_x, episode.support_y).items()}
        with torch.no_grad():
            for i, p in enumerate((theta, phi)):
                totals[i] += per_task_loss(mse_loss, learner.predict(p, episode.query_x), episode.query_y).sum().cpu()
    pre, post = (totals / buffer.n_windows).tolist()
    return {"pred_error_pre": pre, "pred_error_post": post}


def ci95(values) -> float:
    """Half-width of the 95% CI of the mean of ``values``: 1.96 standard errors (0 for one value)."""
    values = np.asarray(values, dtype=float)
    return float(1.96 * values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def return_stats(rollouts: Sequence[Rollout]) -> dict[str, Any]:
    """``returns`` (per episode), ``mean_return``, ``ci95`` (1.96 standard errors; 0 for one episode),
    ``env_steps`` of whole episodes and ``tasks``: each episode's task vector at its first step (``[]`` for envs
    without tasks), to split the returns by task."""
    returns = np.array([float(r.reward.double().sum()) for r in rollouts])
    return {"returns": returns.tolist(), "mean_return": float(returns.mean()), "ci95": ci95(returns),
            "env_steps": int(sum(r.length for r in rollouts)),
            "tasks": [r.task_vector[0].tolist() if r.length else [] for r in rollouts]}


def evaluate(learner, env_id: str, task_split: str = "test", episodes: int = 10, episode_length: int = 1000,
             env_kwargs: dict[str, Any] | None = None, n_envs: int = 5, past_window: int = 16,
             future_window: int = 16, adapt: bool = True, planner: str = "random_shooting", horizon: int = 10,
             n_candidates: int = 500, planner_kwargs: dict[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """Run ``episodes`` episodes of ``env_id`` (``task_split`` tasks) with an :class:`MPCController` and score them.

    ``learner``: a trained dynamics learner, or a :class:`~lit_meta.rl.true_dynamics.TrueDynamics` (unbound:
    it is bound to this evaluation's own envs; the prediction errors are then NaN: there is no model to score).

    Returns a dict: ``returns`` (per episode), ``mean_return``, ``ci95`` (1.96 standard errors), ``tasks`` (each
    episode's task vector at its start),
    ``pred_error_pre`` / ``pred_error_post`` (:func:`prediction_errors` on the episodes' windows),
    ``env_steps`` (taken), ``n_nonfinite`` (planner candidates discarded), ``planner_ms_per_step`` (mean wall
    time of one controller call: adaptation + planning for all ``n_envs`` environments).
    """
    true_dynamics = isinstance(learner, TrueDynamics)
    if not true_dynamics:
        learner.eval()
    kwargs = {**(env_kwargs or {}), "task_split": task_split}
    reward_fn, termination_fn = env_reward_fns(env_id, kwargs)
    collector = RolloutCollector(env_id, kwargs, n_envs=n_envs)
    try:
        obs_dim, action_dim = collector.envs.single_observation_space.shape[0], collector.action_low.shape[0]
        if true_dynamics:
            learner.bind(collector.envs)
        norm = None if true_dynamics else learner.normalizer
        if norm is not None and (obs_dim, action_dim) != (norm.obs_dim, norm.action_dim):
            raise ValueError(
                f"the model (checkpoint) was trained for observations of size {norm.obs_dim} and actions of size "
                f"{norm.action_dim}, but {env_id} has {obs_dim} and {action_dim}: evaluate it on the env it was "
                f"trained on (or one with the same spaces)"
            )
        controller = MPCController(learner, reward_fn, termination_fn, collector.action_low, collector.action_high,
                                   past_window=past_window, adapt=adapt, planner=planner, horizon=horizon,
                                   n_candidates=n_candidates, planner_kwargs=planner_kwargs, seed=seed)
        rollouts = collector.collect(controller, seed, round=0, indices=range(episodes), rollout_length=episode_length)
    finally:
        collector.close()
    return {**return_stats(rollouts),
            **({"pred_error_pre": math.nan, "pred_error_post": math.nan} if true_dynamics
               else prediction_errors(learner, rollouts, past_window, future_window)),
            "n_nonfinite": controller.n_nonfinite,
            "planner_ms_per_step": controller.ms_per_step}
