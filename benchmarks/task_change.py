"""Adaptation after a task change within an episode: prediction error before and after, with and without
online adaptation (Nagabandi et al. 2019: the dynamics may change at any time, e.g. a joint breaks).

Episodes on the env's held-out tasks where the task changes mid-episode in two ways: every
``--change-every`` steps (the env's ``change_every``: a new test task is drawn), and once by user code
(``lit_meta.envs.set_task`` on the vector env at step ``--switch-at``, to the next task of ``--tasks``).
The learner's own MPC controller (with online adaptation) acts. For every change the one-step prediction
error of the normalised state change is measured at each step from ``--before`` steps before to
``--after`` after it (:func:`lit_meta.rl.diagnostics.errors_around_changes`), adapted on the M transitions
just before the step and not adapted.

    python benchmarks/task_change.py DIR/grbal_halfcheetah_crippled.ckpt DIR/mbmpc_halfcheetah_crippled.ckpt
    python benchmarks/task_change.py --quick          # smoke: an untrained GrBAL model, short episodes

Prints, per learner and kind of change, the mean error in the windows [-M, 0), [0, M), [M, 2M) and
[2M, after) around the change, and plots the curves (``--plot``, default docs/task_change.png).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402
from model_quality import DEFAULT_ENV, load  # noqa: E402

import lit_meta.envs  # noqa: E402
from lit_meta.rl import GrBAL, MPCController, RolloutCollector  # noqa: E402
from lit_meta.rl.control import env_reward_fns  # noqa: E402
from lit_meta.rl.diagnostics import errors_around_changes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class SwitchAt:
    """Acts with ``policy``; at step ``at`` of each batch of episodes switches every env to ``task``."""

    def __init__(self, policy, envs, at: int, task: dict) -> None:
        self.policy, self.envs, self.at, self.task, self.steps = policy, envs, at, task, 0

    def reset(self, seeds) -> None:
        self.policy.reset(seeds)
        self.steps = 0

    def __call__(self, obs):
        if self.steps == self.at:
            lit_meta.envs.set_task(self.envs, self.task)
        self.steps += 1
        return self.policy(obs)


def episodes(model, env_id: str, args, kind: str) -> list:
    kwargs = {"task_split": "test", **({"change_every": args.change_every} if kind == "change_every" else {})}
    reward_fn, termination_fn = env_reward_fns(env_id, kwargs)
    collector = RolloutCollector(env_id, kwargs, n_envs=args.n_envs)
    try:
        controller = MPCController(model, reward_fn, termination_fn, collector.action_low, collector.action_high,
                                   past_window=args.past_window, seed=1, planner="random_shooting",
                                   horizon=args.horizon, n_candidates=args.candidates)
        policy = controller
        if kind == "set_task":
            # start every episode on the first task, switch to the second at --switch-at
            first, second = ({"crippled_joint": j} for j in args.tasks)
            policy = SwitchAt(controller, collector.envs, args.switch_at, second)
            return collector.collect(policy, 1234, 1, range(args.episodes), args.episode_length,
                                     reset_options={"task": first})
        return collector.collect(policy, 1234, 0, range(args.episodes), args.episode_length)
    finally:
        collector.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", help="learner checkpoints (--quick with none: an untrained GrBAL)")
    parser.add_argument("--learner", default=None)
    parser.add_argument("--env-id", default=DEFAULT_ENV)
    parser.add_argument("--tasks", nargs=2, default=["fshin", "bshin"], help="set_task: from the first to the second")
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--episode-length", type=int, default=300)
    parser.add_argument("--n-envs", type=int, default=4)
    parser.add_argument("--change-every", type=int, default=100)
    parser.add_argument("--switch-at", type=int, default=150)
    parser.add_argument("--past-window", type=int, default=16)
    parser.add_argument("--before", type=int, default=16)
    parser.add_argument("--after", type=int, default=64)
    parser.add_argument("--horizon", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.episodes, args.n_envs, args.episode_length, args.change_every, args.switch_at = 2, 2, 60, 25, 30
        args.candidates, args.horizon, args.after, args.before = 30, 3, 24, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    M = args.past_window
    results = {}
    for path in args.checkpoints or ["grbal_untrained"]:
        if args.checkpoints:
            name, model = load(path, args.learner)
        else:
            torch.manual_seed(0)
            name, model = "grbal", GrBAL().eval()
        for kind in ("change_every", "set_task"):
            rollouts = episodes(model, args.env_id, args, kind)
            for adapt in (True, False):
                out = errors_around_changes(model, rollouts, M, args.before, args.after, adapt=adapt)
                results[f"{Path(path).name} {kind} {'adapt' if adapt else 'no adapt'}"] = out
                o, e = out["offsets"], out["error"]
                windows = [(a, b) for a, b in [(-M, 0), (0, M), (M, 2 * M), (2 * M, args.after)] if a < args.after]
                means = [np.nanmean(e[(o >= a) & (o < b)]) if ((o >= a) & (o < b) & np.isfinite(e)).any() else np.nan
                         for a, b in windows]
                print(f"{Path(path).name:<34} {kind:<12} adapt={'yes' if adapt else 'no ':<3} changes={out['n_changes']:>3} "
                      + "  ".join(f"[{a},{b}): {m:.4f}" for (a, b), m in zip(windows, means)), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({k: {kk: np.asarray(v).tolist() for kk, v in r.items()}
                                               for k, r in results.items()}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, out in results.items():
        ax.plot(out["offsets"], out["error"], label=label, lw=1, ls="-" if "no adapt" not in label else "--")
    ax.axvline(0, color="k", lw=0.5)
    ax.axvspan(0, M, color="0.9")
    ax.set_xlabel("steps since the task change (grey: the adaptation window straddles it)")
    ax.set_ylabel("one-step error (normalised)")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    fig.tight_layout()
    plot = Path(args.plot) if args.plot else (Path(tempfile.gettempdir()) / "task_change.png" if args.quick
                                              else REPO / "docs" / "task_change.png")
    fig.savefig(plot, dpi=100)
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
