"""Is a learned dynamics model good enough to plan with? Diagnostics on held-out-task episodes.

For each trained learner (a checkpoint, e.g. from ``benchmarks/rl_returns.py --keep DIR``), on the env's
test-split tasks:

* returns of the learner's own MPC controller, and the same planner on the true MuJoCo dynamics;
* candidate ranking (:func:`lit_meta.rl.diagnostics.candidate_ranking`) at the states each controller
  visits: Spearman correlation between predicted and true returns of the planner's candidates, what the
  model's pick is worth (true return of its pick / the best true return), the model's return bias, the
  spread of the candidates' true returns (``spread``) and of the model's error across them (``errSprd``),
  and the slope of the model's returns on the true ones (``slope``; below 1 the model under-reacts to actions);
* open-loop error (:func:`lit_meta.rl.diagnostics.open_loop_errors`) on both controllers' episodes: squared
  observation error after 1 and H steps (units of the training data's std), H-step return error and bias;
  with and without adaptation for the adaptive learners.

    python benchmarks/model_quality.py DIR/mbmpc_halfcheetah_crippled.ckpt DIR/grbal_halfcheetah_crippled.ckpt
    python benchmarks/model_quality.py --quick CKPT          # smoke: 1 episode of 30 steps, 50 candidates

The learner class is read from the checkpoint's file name prefix (``grbal_``, ``igrbal_``, ``rebal_``,
``mbmpc_``, ``pets_``) or given with ``--learner``. Prints one table; ``--json`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402

from lit_meta.rl import (PETS, GrBAL, ImplicitGrBAL, MBMPC, MPCController, ReBAL, RolloutCollector,  # noqa: E402
                         TrueDynamics)
from lit_meta.rl.control import env_reward_fns  # noqa: E402
from lit_meta.rl.diagnostics import RankingProbe, open_loop_errors  # noqa: E402

DEFAULT_ENV = "lit_meta/HalfCheetahCrippledJoint-v0"
LEARNERS = {"igrbal": ImplicitGrBAL, "grbal": GrBAL, "rebal": ReBAL, "mbmpc": MBMPC, "pets": PETS}
#: learners that never adapt: probed without adaptation only
NON_ADAPTIVE = ("mbmpc", "pets")


def load(path: str, name: str | None):
    prefix = name or next((k for k in LEARNERS if Path(path).name.startswith(k + "_")), None)
    if prefix not in LEARNERS:
        raise SystemExit(f"{path}: cannot tell the learner from the file name; pass --learner {{{','.join(LEARNERS)}}}")
    model = LEARNERS[prefix].load_from_checkpoint(path, map_location="cpu", weights_only=False)
    return prefix, model.eval()


def checkpoint_env(path: str) -> str:
    """The env a checkpoint's DataModule collected on (the default env if it has no DataModule)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt.get("datamodule_hyper_parameters", {}).get("env_id", DEFAULT_ENV)


def forward_speed(obs: torch.Tensor, next_obs: torch.Tensor, dt: float) -> float:
    """Mean forward speed of one episode (m/s) from its observations ``[L, obs_dim]`` (x in ``obs[:, 0]``)."""
    return float(next_obs[-1, 0] - obs[0, 0]) / (len(obs) * dt)


def probe(model, env_id: str, args, behaviour: str, adapt: bool) -> dict:
    """Episodes on test tasks acted by the learner's controller ('model') or the true-dynamics planner ('true')."""
    kwargs = {"task_split": "test"}
    reward_fn, termination_fn = env_reward_fns(env_id, kwargs)
    collector = RolloutCollector(env_id, kwargs, n_envs=args.n_envs)
    mpc = dict(planner=args.planner, horizon=args.horizon, n_candidates=args.candidates)
    try:
        dt = float(collector.envs.envs[0].unwrapped.dt)
        low, high = collector.action_low, collector.action_high
        true = TrueDynamics(collector.envs)
        controller = MPCController(model, reward_fn, termination_fn, low, high, adapt=adapt, seed=1, **mpc)
        acting = MPCController(true, reward_fn, termination_fn, low, high, seed=1, **mpc) if behaviour == "true" else None
        policy = RankingProbe(controller, true, every=args.every, n_candidates=args.candidates, seed=2, behaviour=acting)
        start = time.perf_counter()
        rollouts = collector.collect(policy, 1234, 0, range(args.episodes), args.episode_length)
        seconds = time.perf_counter() - start
    finally:
        collector.close()
    returns = [float(r.reward.double().sum()) for r in rollouts]
    errors = open_loop_errors(model, rollouts, reward_fn, horizon=args.horizon, adapt=adapt)
    return {"behaviour": behaviour, "adapt": adapt, "mean_return": float(np.mean(returns)), "returns": returns,
            "speed": float(np.mean([forward_speed(r.obs, r.next_obs, dt) for r in rollouts])),
            **{f"rank_{k}": v for k, v in policy.summary().items()}, **{f"ol_{k}": v for k, v in errors.items()},
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", help="learner checkpoints (with --quick and none: an untrained "
                        "MB-MPC model, to check the script)")
    parser.add_argument("--learner", choices=list(LEARNERS), default=None)
    parser.add_argument("--env-id", default=None, help="default: the checkpoint's DataModule env")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--episode-length", type=int, default=200)
    parser.add_argument("--n-envs", type=int, default=2)
    parser.add_argument("--every", type=int, default=10, help="env steps between candidate-ranking probes")
    parser.add_argument("--planner", default="random_shooting")
    parser.add_argument("--horizon", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--behaviours", nargs="+", default=["model", "true"], choices=["model", "true"])
    parser.add_argument("--quick", action="store_true", help="smoke: 1 episode of 30 steps, 50 candidates")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.episodes, args.episode_length, args.candidates, args.n_envs, args.every = 1, 30, 50, 1, 10
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    if not args.checkpoints and not args.quick:
        parser.error("give at least one checkpoint (benchmarks/rl_returns.py --keep DIR writes them)")
    rows = []
    for path in args.checkpoints or ["mbmpc_untrained"]:
        if args.checkpoints:
            name, model = load(path, args.learner)
            env_id = args.env_id or checkpoint_env(path)
        else:
            name, model, env_id = "mbmpc", MBMPC().eval(), args.env_id or DEFAULT_ENV
        for behaviour in args.behaviours:
            for adapt in ([True, False] if name not in NON_ADAPTIVE else [False]):
                row = {"checkpoint": Path(path).name, "learner": name, "env_id": env_id,
                       **probe(model, env_id, args, behaviour, adapt)}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "returns"}), flush=True)
    print(f"\n{'checkpoint':<36} {'acting':<6} {'adapt':<5} {'return':>8} {'m/s':>5} {'spearman':>8} {'pick':>6} "
          f"{'bias':>7} {'spread':>7} {'errSprd':>7} {'slope':>6} {'err1':>7} {'errH':>7} {'retErr':>7} {'retBias':>7}")
    for r in rows:
        print(f"{r['checkpoint']:<36} {r['behaviour']:<6} {'yes' if r['adapt'] else 'no':<5} {r['mean_return']:>8.1f} "
              f"{r['speed']:>5.2f} {r['rank_spearman']:>8.3f} {r['rank_pick_value']:>6.2f} {r['rank_model_bias']:>7.2f} "
              f"{r['rank_true_spread']:>7.2f} {r['rank_error_spread']:>7.2f} {r['rank_slope']:>6.2f} "
              f"{r['ol_err_1']:>7.4f} {r['ol_err_h']:>7.3f} {r['ol_return_err']:>7.2f} {r['ol_return_bias']:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
