"""How does a controller move the cheetah? Gait figures per episode, by task, on HalfCheetahCrippledJoint.

For a kept learner (``benchmarks/rl_returns.py --keep DIR``) or the true dynamics (``true``), MPC episodes on the
chosen crippled joints, and per episode: the return, the mean forward speed (m/s), the share of steps the cheetah
spends upside down (torso pitch past 90 degrees: ``cos(obs[2]) < 0``) and the step it first turns over. Two
controls that separate the causes of a low return:

* ``--pin JOINT ...``: the planner holds these joints' actions at 0, i.e. it is told which joint is crippled
  (an oracle: the held-out task known without adaptation). If the return stays low, identifying the task is not
  what the controller lacks.
* ``--upright W``: the planner's objective is the env's reward minus ``W * max(0, |pitch| - 1 rad)`` per step, so
  plans that turn the cheetah over score lower (the reported return is always the env's own reward).

    python benchmarks/gait.py DIR/mbmpc_halfcheetah_crippled.ckpt --joints bshin          # 5 x 300 steps
    python benchmarks/gait.py DIR/mbmpc_halfcheetah_crippled.ckpt --joints bshin --pin bshin
    python benchmarks/gait.py true --joints bshin                                          # the true dynamics
    python benchmarks/gait.py DIR/mbmpc_halfcheetah_crippled.ckpt --split train --upright 10
    python benchmarks/gait.py DIR/mbmpc_halfcheetah_crippled.ckpt --training-data          # its collection rounds
    python benchmarks/gait.py --quick                                                      # smoke: untrained model

``--training-data`` runs no episode: it reads the checkpoint's stored rollouts (the DataModule's buffer, saved with
every checkpoint) and prints the same gait figures per collection round (round 0: the random rollouts), i.e. whether
the data reach the states the controller is asked to plan from.

Planner: MPPI 500 x 10, 3 iterations, warm start (the comparison's settings; ``--mpc`` JSON over them). Episodes
use ``--seed`` (default 1234, as ``rl_returns.py``). Prints one table; ``--json`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402
from model_quality import forward_speed, load  # noqa: E402
from rl_returns import json_dict  # noqa: E402

from lit_meta.envs.half_cheetah import JOINTS  # noqa: E402
from lit_meta.rl import MBMPC, MPCController, RolloutCollector, TrueDynamics  # noqa: E402
from lit_meta.rl.control import check_mpc, ci95, env_reward_fns, prediction_errors, return_stats  # noqa: E402

ENV_ID = "lit_meta/HalfCheetahCrippledJoint-v0"
MPC = {"planner": "mppi", "horizon": 10, "n_candidates": 500, "planner_kwargs": {"iterations": 3}}


def gait(obs: torch.Tensor, next_obs: torch.Tensor, dt: float) -> dict:
    """One episode's gait from its observations ``[L, 18]`` (HalfCheetah: ``obs[:, 0]`` x, ``obs[:, 2]`` pitch):
    mean forward speed (m/s), share of steps upside down (``cos(pitch) < 0`` after the step) and the first such step
    (-1: never)."""
    upside_down = torch.cos(next_obs[:, 2]) < 0
    return {"speed": forward_speed(obs, next_obs, dt),
            "upside_down": float(upside_down.double().mean()),
            "first_flip": int(upside_down.nonzero()[0, 0]) if bool(upside_down.any()) else -1}


def task_name(task) -> str:
    """The crippled joints of a task vector, joined by '+' ("none": the intact cheetah)."""
    return "+".join(JOINTS[i] for i in np.flatnonzero(np.asarray(task) > 0.5)) or "none"


def upright_objective(reward_fn, weight: float):
    """The planner's objective: ``reward_fn`` minus ``weight * max(0, |pitch| - 1)`` per step (pitch in rad)."""
    def objective(obs, action, next_obs):
        return reward_fn(obs, action, next_obs) - weight * torch.relu(next_obs[..., 2].abs() - 1.0)
    return objective


def training_data(path: str) -> list[dict]:
    """The gait of a checkpoint's training data, one dict per collection round: ``round``, ``rollouts``, ``tasks``
    (crippled joints, one per rollout), mean ``speed`` (m/s) and its per-rollout ``max_speed``, ``upside_down``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state, config = ckpt.get("RolloutDataModule"), ckpt.get("lit_meta_run", {}).get("config", {})
    if not state or not state["buffer"]["data"]:
        raise SystemExit(f"{path}: no stored rollouts (not a checkpoint of a RolloutDataModule run)")
    init = config.get("data", {}).get("init_args", {})
    first, per_round = init.get("initial_rollouts", 10), init.get("rollouts_per_round", 10)
    env_id = init.get("env_id", ENV_ID)
    if env_id != ENV_ID:
        raise SystemExit(f"{path}: trained on {env_id}; the gait figures read HalfCheetah observations ({ENV_ID})")
    data = state["buffer"]["data"]
    env = gym.make(ENV_ID)
    dt = float(env.unwrapped.dt)
    env.close()
    rounds: dict[int, list[dict]] = {}
    for k in data["rollout"].unique().tolist():
        rows = data["rollout"] == k
        r = 0 if k < first else 1 + (k - first) // per_round
        rounds.setdefault(r, []).append({"task": task_name(data["task_vector"][rows][0].numpy()),
                                         **gait(data["obs"][rows], data["next_obs"][rows], dt)})
    return [{"round": r, "rollouts": len(eps), "tasks": [e["task"] for e in eps],
             "speed": float(np.mean([e["speed"] for e in eps])), "max_speed": max(e["speed"] for e in eps),
             "upside_down": float(np.mean([e["upside_down"] for e in eps]))} for r, eps in sorted(rounds.items())]


def run(learner, args) -> tuple[list[dict], dict]:
    """``args.episodes`` MPC episodes on the chosen tasks: a dict per episode (task, return, :func:`gait` and the
    rms action of each joint, ``action_rms``) and the learner's K-step prediction error on the episodes' windows
    (:func:`lit_meta.rl.control.prediction_errors`, M = K = 16; empty for the true dynamics)."""
    split = args.split
    kwargs = {"task_split": split}
    if args.joints:
        kwargs["test_joints" if split == "test" else "train_joints"] = tuple(args.joints)
        if split == "train":
            kwargs["train_intact"] = False
    reward_fn, termination_fn = env_reward_fns(ENV_ID, kwargs)
    objective = upright_objective(reward_fn, args.upright) if args.upright else reward_fn
    collector = RolloutCollector(ENV_ID, kwargs, n_envs=min(args.episodes, 5))
    try:
        dt = float(collector.envs.envs[0].unwrapped.dt)
        low, high = collector.action_low.copy(), collector.action_high.copy()
        pinned = [JOINTS.index(j) for j in args.pin]
        low[pinned] = high[pinned] = 0.0
        if isinstance(learner, TrueDynamics):
            learner.bind(collector.envs)
        controller = MPCController(learner, objective, termination_fn, low, high, adapt=not args.no_adapt,
                                   seed=args.seed, **{**MPC, **args.mpc})
        rollouts = collector.collect(controller, args.seed, 0, range(args.episodes), args.episode_length)
    finally:
        collector.close()
    stats, rows = return_stats(rollouts), []
    for r, ret, task in zip(rollouts, stats["returns"], stats["tasks"]):
        rows.append({"task": task_name(task), "return": ret, **gait(r.obs, r.next_obs, dt),
                     "action_rms": dict(zip(JOINTS, r.action.double().square().mean(0).sqrt().tolist()))})
    errors = {} if isinstance(learner, TrueDynamics) else prediction_errors(learner, rollouts, 16, 16)
    return rows, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", help="learner checkpoints, or 'true' for the true dynamics "
                        "(with --quick and none: an untrained MB-MPC model, to check the script)")
    parser.add_argument("--split", choices=["test", "train"], default="test")
    parser.add_argument("--joints", nargs="+", choices=JOINTS, default=None,
                        help="crippled joints to draw tasks from (default: the split's own)")
    parser.add_argument("--pin", nargs="+", choices=JOINTS, default=[],
                        help="joints whose actions the planner holds at 0")
    parser.add_argument("--upright", type=float, default=0.0,
                        help="weight of the upright term in the planner's objective (per rad past 1 rad, per step)")
    parser.add_argument("--training-data", action="store_true",
                        help="no episodes: the gait of each checkpoint's stored collection rounds")
    parser.add_argument("--no-adapt", action="store_true", help="adaptive learners: plan with the meta-learned weights")
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--episode-length", type=int, default=300)
    parser.add_argument("--mpc", type=json_dict, default={}, help="planner settings over MPPI 500 x 10 x 3, as JSON")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--quick", action="store_true",
                        help="smoke: 1 episode of 40 steps (the K-step windows need 32), 50 candidates")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if {"adapt", "seed"} & set(args.mpc):
        parser.error("--mpc: set adaptation with --no-adapt and the seed with --seed, not in --mpc")
    try:
        check_mpc({**MPC, **args.mpc}, where="--mpc")
    except ValueError as err:
        parser.error(str(err))
    if args.quick:
        args.episodes, args.episode_length, args.mpc = 1, 40, {**args.mpc, "n_candidates": 50}
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    if not args.checkpoints and not args.quick:
        parser.error("give a checkpoint (benchmarks/rl_returns.py --keep DIR writes them) or 'true'")
    if args.training_data:
        if not args.checkpoints or "true" in args.checkpoints:
            parser.error("--training-data reads checkpoints (written by rl_returns.py --keep DIR), not 'true'")
        results = [{"checkpoint": p, "rounds": training_data(p)} for p in args.checkpoints]
        print(f"\n{'checkpoint':<36} {'round':>5} {'rollouts':>8} {'m/s':>5} {'max m/s':>7} {'upside down':>11}  tasks")
        for res in results:
            for r in res["rounds"]:
                print(f"{res['checkpoint']:<36} {r['round']:>5} {r['rollouts']:>8} {r['speed']:>5.2f} "
                      f"{r['max_speed']:>7.2f} {r['upside_down']:>11.0%}  {' '.join(r['tasks'])}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    results = []
    for path in args.checkpoints or ["mbmpc_untrained"]:
        if path == "true":
            learner = TrueDynamics()
        elif args.checkpoints:
            learner = load(path, None)[1]
        else:
            learner = MBMPC().eval()
        start = time.perf_counter()
        episodes, errors = run(learner, args)
        results.append({"checkpoint": Path(path).name, "pin": args.pin, "upright": args.upright,
                        "adapt": not args.no_adapt, "split": args.split, "episodes": episodes, **errors,
                        "seconds": time.perf_counter() - start})
    print(f"\n{'checkpoint':<36} {'task':<8} {'n':>3} {'return':>16} {'m/s':>5} {'upside down':>11} {'first flip':>10}")
    for res in results:
        for task in sorted({e["task"] for e in res["episodes"]}):
            eps = [e for e in res["episodes"] if e["task"] == task]
            returns = [e["return"] for e in eps]
            flips = [e["first_flip"] for e in eps if e["first_flip"] >= 0]
            print(f"{res['checkpoint']:<36} {task:<8} {len(eps):>3} {np.mean(returns):>8.1f} +- {ci95(returns):>5.1f} "
                  f"{np.mean([e['speed'] for e in eps]):>5.2f} {np.mean([e['upside_down'] for e in eps]):>11.0%} "
                  f"{(np.median(flips) if flips else math.nan):>10.0f}")
        if "pred_error_pre" in res:
            print(f"{res['checkpoint']:<36} K-step error on these episodes' windows: {res['pred_error_pre']:.4f} "
                  f"(adapted: {res['pred_error_post']:.4f})")
    print(f"(pin {args.pin or 'none'}, upright weight {args.upright}, {'no ' if args.no_adapt else ''}adaptation, "
          f"{args.split} split, seed {args.seed}; first flip: median step among episodes that turned over)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
