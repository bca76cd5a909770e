"""How strong should GrBAL's online adaptation be? Open-loop error after other inner steps / step sizes.

A gradient-adapted dynamics learner (GrBAL, ImplicitGrBAL; a checkpoint from ``benchmarks/rl_returns.py --keep
DIR``) acts with its own adapted MPC controller on training-split and test-split tasks; on those episodes, the
open-loop prediction quality (:func:`lit_meta.rl.diagnostics.open_loop_errors`: squared observation error after 1
and ``--horizon`` steps in units of the training data's std, ``horizon``-step return error and bias) without
adaptation and after adapting on the ``--past-window`` transitions before each start with every
``--inner-steps`` x ``--inner-lr`` of the grid (the learner's own settings are one point of it). Choose on the
training split; the test split shows whether the choice carries to unseen tasks.

    python benchmarks/adaptation_strength.py DIR/grbal_halfcheetah_crippled.ckpt
    python benchmarks/adaptation_strength.py --quick          # smoke: an untrained GrBAL, 1 episode of 30 steps

Prints one table and plots the return error against the step size, one line per number of steps
(``--plot``, default docs/adaptation_strength.png; a temp file with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, save_figure  # noqa: E402
from model_quality import DEFAULT_ENV, checkpoint_env, load  # noqa: E402

from lit_meta.rl import GrBAL, MPCController, RolloutCollector  # noqa: E402
from lit_meta.rl.control import env_reward_fns  # noqa: E402
from lit_meta.rl.diagnostics import open_loop_errors  # noqa: E402

KEYS = ("err_1", "err_h", "return_err", "return_bias")


def episodes(model, env_id: str, split: str, args) -> tuple[list, object]:
    """``--episodes`` episodes of ``split`` tasks acted by the learner's own adapted controller, and the reward."""
    kwargs = {"task_split": split}
    reward_fn, termination_fn = env_reward_fns(env_id, kwargs)
    collector = RolloutCollector(env_id, kwargs, n_envs=args.n_envs)
    try:
        controller = MPCController(model, reward_fn, termination_fn, collector.action_low, collector.action_high,
                                   adapt=True, seed=1, planner=args.planner, horizon=args.horizon,
                                   n_candidates=args.candidates)
        return collector.collect(controller, args.seed, 0, range(args.episodes), args.episode_length), reward_fn
    finally:
        collector.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="a GrBAL / ImplicitGrBAL checkpoint (with --quick and none: "
                        "an untrained GrBAL, to check the script)")
    parser.add_argument("--learner", choices=["grbal", "igrbal"], default=None,
                        help="default: from the file name prefix")
    parser.add_argument("--env-id", default=None, help="default: the checkpoint's DataModule env")
    parser.add_argument("--splits", nargs="+", default=["train", "test"], choices=["train", "test"])
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--inner-lr", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--episode-length", type=int, default=300)
    parser.add_argument("--n-envs", type=int, default=4)
    parser.add_argument("--past-window", type=int, default=16, help="transitions adapted on (the configs' M)")
    parser.add_argument("--planner", default="random_shooting")
    parser.add_argument("--horizon", type=int, default=10, help="planner horizon and open-loop horizon H")
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--seed", type=int, default=4321)
    parser.add_argument("--quick", action="store_true", help="smoke: 1 episode of 30 steps, 50 candidates")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    if args.quick:
        args.episodes, args.episode_length, args.candidates, args.n_envs = 1, 30, 50, 1
        args.inner_steps, args.inner_lr = args.inner_steps[:2], args.inner_lr[:2]
    if min(args.inner_steps) < 1 or min(args.inner_lr) <= 0:
        parser.error("--inner-steps must be >= 1 and --inner-lr > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    if args.checkpoint:
        _, model = load(args.checkpoint, args.learner)
        env_id = args.env_id or checkpoint_env(args.checkpoint)
    elif args.quick:
        model, env_id = GrBAL().eval(), args.env_id or DEFAULT_ENV
    else:
        parser.error("give a GrBAL / ImplicitGrBAL checkpoint (benchmarks/rl_returns.py --keep DIR writes them)")
    if not hasattr(model, "inner_lr"):
        parser.error(f"{type(model).__name__} does not adapt by gradient steps: give a GrBAL / ImplicitGrBAL checkpoint")
    own = (model.inner_steps, model.inner_lr)
    rows = []
    for split in args.splits:
        rollouts, reward_fn = episodes(model, env_id, split, args)
        returns = [round(float(r.reward.sum()), 1) for r in rollouts]
        print(f"{split}: returns of the adapted controller {returns}", flush=True)
        settings = [(0, 0.0)] + [(s, lr) for s in args.inner_steps for lr in args.inner_lr]
        for steps, lr in settings:
            if steps:
                model.inner_steps, model.inner_lr = steps, lr
            errors = open_loop_errors(model, rollouts, reward_fn, horizon=args.horizon, past_window=args.past_window,
                                      adapt=bool(steps))
            rows.append({"split": split, "inner_steps": steps, "inner_lr": lr, **errors})
        model.inner_steps, model.inner_lr = own
    print(f"\n{env_id}, {args.episodes} x {args.episode_length} steps per split, the learner's own setting: "
          f"{own[0]} step(s) of {own[1]}; H = {args.horizon}")
    print(f"{'split':<6} {'steps':>5} {'lr':>6} {'err1':>9} {'errH':>11} {'retErr':>10} {'retBias':>10}")
    for r in rows:
        setting = "none" if not r["inner_steps"] else f"{r['inner_steps']:>5} {r['inner_lr']:>6g}"
        print(f"{r['split']:<6} {setting:>12} {r['err_1']:>9.4f} {r['err_h']:>11.4g} {r['return_err']:>10.4g} "
              f"{r['return_bias']:>10.4g}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    plot = args.plot or (str(Path(tempfile.gettempdir()) / "adaptation_strength_quick.png") if args.quick
                         else "docs/adaptation_strength.png")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(args.splits), figsize=(5 * len(args.splits), 4), squeeze=False)
    for ax, split in zip(axes[0], args.splits):
        base = next(r["return_err"] for r in rows if r["split"] == split and not r["inner_steps"])
        ax.axhline(base, color="k", ls="--", label="no adaptation")
        for steps in args.inner_steps:
            pts = [(r["inner_lr"], r["return_err"]) for r in rows if r["split"] == split and r["inner_steps"] == steps]
            pts = [(x, y) for x, y in pts if math.isfinite(y)]
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"{steps} step(s)")
        ax.set(xscale="log", yscale="log", xlabel="inner_lr", ylabel=f"{args.horizon}-step return error",
               title=f"{split} tasks")
        ax.legend()
    save_figure(fig, plot)


if __name__ == "__main__":
    main()
