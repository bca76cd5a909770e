"""How precise must a dynamics model be for the planner? The true dynamics from a slightly wrong state.

A learned model errs at every step; this asks what a planner loses when the only error is a small one in the
state it plans from, with the dynamics themselves exact. For noise levels s (in units of the observation std of
the configs' initial data: 10 random rollouts of 1,000 steps on the training tasks), on test-split tasks:

* ranking: at the states the true-dynamics planner visits (every ``--every`` steps from step 20), the same
  ``--candidates`` uniform candidates scored by the true dynamics from the exact state and from the state with
  Gaussian noise of s x std added to every position and velocity but x
  (:func:`lit_meta.rl.diagnostics.ranking_stats`: Spearman, slope, error spread, true spread, as
  ``benchmarks/model_quality.py`` reports them for learned models);
* return: the true-dynamics planner acting on the real env but planning, at every step, from a state with such
  noise (redrawn every step).

Learned models' one-step errors are in the same units (``err1`` of ``model_quality.py`` is a mean square: 0.12
is an rms of 0.35 std), so the table says where a model must get before the planner can use it.

    python benchmarks/state_sensitivity.py                    # HalfCheetahCrippledJoint, 2 x 200 steps, ~10 min
    python benchmarks/state_sensitivity.py --quick            # smoke: 1 episode of 30 steps, 2 levels

HalfCheetah envs only (their observation is the MuJoCo state: ``qpos[:9] + qvel[:9]``). Prints a table; writes a
plot (``--plot``, default ``docs/state_sensitivity.png``) and ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, save_figure  # noqa: E402

import lit_meta.envs  # noqa: E402,F401
from lit_meta.rl import RolloutCollector, TrueDynamics  # noqa: E402
from lit_meta.rl.control import MPCController, env_reward_fns  # noqa: E402
from lit_meta.rl.diagnostics import ranking_stats  # noqa: E402
from lit_meta.rl.planners import candidate_returns  # noqa: E402

KEYS = ("spearman", "slope", "error_spread", "true_spread", "pick_value")


def data_std(env_id: str, rollouts: int, length: int) -> np.ndarray:
    """Observation std of ``rollouts`` uniform-random rollouts on the training tasks (the configs' round 0)."""
    collector = RolloutCollector(env_id, {"task_split": "train"}, n_envs=2)
    try:
        data = collector.collect(collector.random_policy(), 0, 0, range(rollouts), length)
    finally:
        collector.close()
    return torch.cat([r.obs for r in data]).double().std(0).clamp_min(1e-6).numpy()


def perturbed(env, std: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Put the env in its current state plus noise (``level`` x ``std`` on every qpos/qvel but x); return that
    observation. The caller restores the state."""
    u = env.unwrapped
    nq = u.data.qpos.size
    qpos = u.data.qpos + np.concatenate([[0.0], level * std[1:nq] * rng.standard_normal(nq - 1)])
    qvel = u.data.qvel + level * std[nq:] * rng.standard_normal(u.data.qvel.size)
    u.set_state(qpos, qvel)
    return u._get_obs().astype(np.float32)


def run_episode(env_id: str, episode: int, args, levels: list[float] | None = None, std: np.ndarray | None = None,
                rngs: list[np.random.Generator] | None = None, plan_from: tuple | None = None) -> tuple[float, list]:
    """One test-split episode of the true-dynamics planner; return ``(return, probes)``.

    ``plan_from=None``: it plans from the exact state and, at every probe, scores the same candidates from the
    exact state (once) and from the state with each level's noise (``levels``, ``rngs``): ``probes`` holds one
    :func:`ranking_stats` dict per level. ``plan_from=(level, rng)``: it plans from that noisy state, no probes."""
    reward_fn, termination_fn = env_reward_fns(env_id, {"task_split": "test"})
    env = gym.make(env_id, task_split="test")
    try:
        obs, _ = env.reset(seed=1234 + episode)
        u = env.unwrapped
        if len(obs) != u.data.qpos.size + u.data.qvel.size:
            raise SystemExit(f"{env_id}: its observation is not qpos + qvel; only HalfCheetah envs are supported")
        true = TrueDynamics(env)
        low, high = torch.tensor(env.action_space.low), torch.tensor(env.action_space.high)
        controller = MPCController(true, reward_fn, termination_fn, low, high, seed=1, horizon=args.horizon,
                                   n_candidates=args.candidates)
        controller.reset([0])
        total, probes = 0.0, []
        for t in range(args.episode_length):
            qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
            if plan_from is not None:
                action = controller(perturbed(env, std, plan_from[0], plan_from[1])[None])[0]
                u.set_state(qpos, qvel)
            else:
                if t % args.every == 0 and t >= min(20, args.episode_length // 2):
                    g = torch.Generator().manual_seed(1000 * episode + t)
                    acts = low + (high - low) * torch.rand(1, args.candidates, args.horizon, len(low), generator=g)
                    real = candidate_returns(true.dynamics(args.horizon), reward_fn,
                                             torch.as_tensor(obs, dtype=torch.float32)[None], acts, termination_fn)
                    row = []
                    for level, rng in zip(levels, rngs):
                        noisy_obs = torch.as_tensor(perturbed(env, std, level, rng))[None]
                        noisy = candidate_returns(true.dynamics(args.horizon), reward_fn, noisy_obs,
                                                  acts, termination_fn)
                        u.set_state(qpos, qvel)
                        row.append({k: float(v[0]) for k, v in ranking_stats(noisy, real).items()})
                    probes.append(row)
                action = controller(obs[None])[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return total, probes
    finally:
        env.close()


def run_levels(env_id: str, levels: list[float], std: np.ndarray, args) -> list[dict]:
    """Per episode: one exact-state episode that probes the ranking at every level, then one noisy-state episode
    per level > 0 (level 0's return is the exact episode's). Each level draws its noise from its own stream."""
    rngs = [np.random.default_rng(0) for _ in levels]
    stats = [[] for _ in levels]
    returns = [[] for _ in levels]
    for episode in range(args.episodes):
        exact_return, probes = run_episode(env_id, episode, args, levels, std, rngs)
        for row in probes:
            for i, s in enumerate(row):
                stats[i].append(s)
        for i, level in enumerate(levels):
            returns[i].append(exact_return if level == 0 else
                              run_episode(env_id, episode, args, std=std, plan_from=(level, rngs[i]))[0])
    return [{"level": level, **{k: float(np.nanmean([s[k] for s in stats[i]])) for k in KEYS},
             "probes": len(stats[i]), "returns": returns[i], "mean_return": float(np.mean(returns[i]))}
            for i, level in enumerate(levels)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="lit_meta/HalfCheetahCrippledJoint-v0")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.003, 0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--episode-length", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--horizon", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="1 episode of 30 steps, levels 0 and 0.1, 50 candidates")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", default=None, help="default docs/state_sensitivity.png (a temp file with --quick)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.episodes, args.episode_length, args.levels, args.candidates, args.every = 1, 30, [0.0, 0.1], 50, 5
    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    start = time.perf_counter()
    std = data_std(args.env_id, 2 if args.quick else 10, 100 if args.quick else 1000)
    rows = run_levels(args.env_id, args.levels, std, args)
    for row in rows:
        print(json.dumps(row), flush=True)
    base = rows[0]["mean_return"] if rows[0]["level"] == 0 else float("nan")
    print(f"\n{args.env_id}, test split, {args.episodes} x {args.episode_length} steps, random shooting "
          f"{args.candidates} x {args.horizon}; noise in units of the random data's obs std ({time.perf_counter() - start:.0f} s)")
    print(f"{'noise':>6} {'spearman':>8} {'slope':>6} {'errSprd':>7} {'spread':>6} {'pick':>5} {'return':>7} {'% of exact':>10}")
    for r in rows:
        print(f"{r['level']:>6.3f} {r['spearman']:>8.3f} {r['slope']:>6.2f} {r['error_spread']:>7.2f} "
              f"{r['true_spread']:>6.2f} {r['pick_value']:>5.2f} {r['mean_return']:>7.1f} {100 * r['mean_return'] / base:>9.0f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    levels = [max(r["level"], min(x for x in args.levels if x > 0) / 3) for r in rows]
    ax.plot(levels, [r["spearman"] for r in rows], "o-", label="Spearman of candidate returns")
    ax.plot(levels, [r["mean_return"] / base for r in rows], "s-", label="planner return / exact state")
    ax.set_xscale("log")
    ax.set_xlabel("state noise (x obs std of the random data; leftmost point: none)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{args.env_id.split('/')[-1]}: true dynamics from a wrong state")
    ax.legend()
    plot = args.plot or ("/tmp/state_sensitivity_quick.png" if args.quick else "docs/state_sensitivity.png")
    save_figure(fig, plot)


if __name__ == "__main__":
    main()
