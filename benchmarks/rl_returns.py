"""GrBAL / ReBAL / MB-MPC on held-out perturbations: the experiment of Nagabandi et al. 2019 (Fig. 3-4).

For each env and method: meta-train with the method's config (``configs/{method}_{env}.yaml``, the same
data budget for all: the same random rollouts, aggregation rounds and rollout lengths), then run
``--episodes`` test-split episodes (tasks unseen in training) with online adaptation + MPC and report
mean return +- 95% CI, the model's K-step prediction error without and with adaptation (normalised
state change, on the episodes' own windows), and the environment steps each method consumed. ``pets`` (PETS's
probabilistic ensemble, :class:`lit_meta.rl.PETS`) is a second non-adaptive baseline next to ``mbmpc``; a method
without a config for an env is skipped for it (so far only ``configs/pets_halfcheetah_crippled.yaml``). Two
reference arms need no training: ``true`` (the same planner with the true MuJoCo dynamics,
:class:`lit_meta.rl.TrueDynamics`: the upper bound) and ``random`` (uniform random actions).

    python benchmarks/rl_returns.py --envs halfcheetah_crippled              # CPU budget configs, all arms
    python benchmarks/rl_returns.py --quick                                  # smoke: tiny budget, minutes
    python benchmarks/rl_returns.py --methods true random                    # the reference arms only
    python benchmarks/rl_returns.py --methods grbal --monitors --keep DIR    # + learning curve, checkpoint kept
    python benchmarks/rl_returns.py --full                                   # all three envs, all methods
    python benchmarks/rl_returns.py --load a.json b.json     # table + plots from earlier --json runs
    python benchmarks/rl_returns.py --methods mbmpc --json seed1.json --set --seed_everything 1   # then --load
                                   # seed*.json: a row per training seed and the mean over seeds +- 95% CI
    python benchmarks/rl_returns.py --checkpoints DIR --eval-seed 4321      # kept learners on fresh episodes
    python benchmarks/rl_returns.py --checkpoints DIR --mpc '{"planner": "mppi", "planner_kwargs": {"iterations": 3}}'
                                   # no training: evaluate DIR's --keep checkpoints, every arm with these planner settings

Writes a table to stdout, a bar chart to docs/rl_returns.png (``--plot``) and, when the runs logged held-out
returns during training (``--monitors``: the configs' DynamicsMonitor), the sample-efficiency plot
docs/rl_sample_efficiency.png (held-out return vs training env steps, the reference arms as lines). Runs in
the current folder's ``logs/``; the trained checkpoints are kept only with ``--keep DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402

from lit_meta.cli import main as cli_main  # noqa: E402
from lit_meta.rl import RolloutCollector, TrueDynamics, evaluate  # noqa: E402
from lit_meta.rl.control import check_mpc, ci95, return_stats  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ("grbal", "rebal", "mbmpc", "pets")
#: the learners that never adapt: evaluated without adaptation only
NON_ADAPTIVE = ("mbmpc", "pets")
#: the reference arms: the same planner on the true MuJoCo dynamics (upper bound), and uniform random actions
REFERENCES = ("true", "random")
ENVS = ("halfcheetah_crippled", "ant_crippled", "halfcheetah_pier")
QUICK = ["--trainer.max_epochs", "2", "--data.init_args.initial_rollouts", "2", "--data.init_args.rollouts_per_round",
         "1", "--data.init_args.rollout_length", "100", "--data.init_args.steps_per_epoch", "20",
         "--data.init_args.val_rollouts", "1", "--data.init_args.eval_episodes", "50",
         "--model.init_args.mpc", '{"planner": "random_shooting", "horizon": 5, "n_candidates": 100}']


def eval_mpc(mpc: dict, args) -> dict:
    """The planner settings of an evaluation: the config's ``mpc``, then ``--mpc``, ``--quick``, ``--eval-candidates``."""
    mpc = {**mpc, **args.mpc}
    if "planner" in args.mpc and "planner_kwargs" not in args.mpc:
        mpc.pop("planner_kwargs", None)  # another planner: the config's planner arguments may not apply
    return {**mpc, **({"horizon": 5, "n_candidates": 100} if args.quick else {}),
            **({"n_candidates": args.eval_candidates} if args.eval_candidates else {})}


def reference(method: str, env: str, args) -> dict:
    """The true-dynamics planner (the mbmpc config's env and planner settings) or random actions: no training."""
    config = yaml.safe_load((REPO / "configs" / f"mbmpc_{env}.yaml").read_text())
    data = config["data"]["init_args"]
    mpc = eval_mpc(dict(config["model"]["init_args"].get("mpc") or {}), args)
    length = 100 if args.quick else args.episode_length
    start = time.perf_counter()
    if method == "true":
        result = evaluate(TrueDynamics(), data["env_id"], "test", episodes=args.episodes, episode_length=length,
                          env_kwargs=data.get("env_kwargs"), n_envs=min(args.episodes, 5), seed=args.eval_seed, **mpc)
    else:
        collector = RolloutCollector(data["env_id"], {**(data.get("env_kwargs") or {}), "task_split": "test"},
                                     n_envs=min(args.episodes, 5))
        try:
            rollouts = collector.collect(collector.random_policy(), args.eval_seed, 0, range(args.episodes), length)
        finally:
            collector.close()
        result = {**return_stats(rollouts), "pred_error_pre": float("nan"), "pred_error_post": float("nan"),
                  "planner_ms_per_step": float("nan")}
    result["eval_s"] = time.perf_counter() - start
    print(f"{env} {method}: return {result['mean_return']:.1f} +- {result['ci95']:.1f}, "
          f"{result['planner_ms_per_step']:.0f} ms/step", flush=True)
    return {"train_env_steps": 0, "train_s": 0.0, "mpc": mpc if method == "true" else {}, "eval_seed": args.eval_seed,
            "no_adapt": result}


def load_kept(method: str, env: str, args):
    """A learner kept by an earlier ``--keep`` run, the config's DataModule settings and that run's
    ``{"train_s", "curve", "train_env_steps"}`` (its sidecar JSON; NaN / none / -1 if missing)."""
    from model_quality import load

    path = Path(args.checkpoints) / f"{method}_{env}.ckpt"
    if not path.is_file():
        raise SystemExit(f"--checkpoints {args.checkpoints}: no {path.name} there (written by a run with --keep "
                         f"{args.checkpoints}); drop {method} from --methods or train it")
    model = load(str(path), method)[1]
    sidecar = path.with_suffix(".json")
    meta = {"train_s": float("nan"), "curve": [], "train_env_steps": -1,
            **(json.loads(sidecar.read_text()) if sidecar.is_file() else {})}
    config = yaml.safe_load((REPO / "configs" / f"{method}_{env}.yaml").read_text())
    return model, dict(config["data"]["init_args"]), meta


def run(method: str, env: str, args) -> dict:
    if method in REFERENCES:
        return reference(method, env, args)
    if args.checkpoints:
        model, data, meta = load_kept(method, env, args)
        # the learning curve was measured with the training config's planner: not carried over to another one
        curve = [] if args.mpc else meta.get("curve", [])
        return evaluate_learner(method, model, data["env_id"], data.get("env_kwargs"), data.get("past_window", 16),
                                data.get("future_window", 16), meta["train_env_steps"], meta["train_s"], curve, args)
    config = yaml.safe_load((REPO / "configs" / f"{method}_{env}.yaml").read_text())
    # no checkpoints (not kept); the config's monitors only with --monitors (in-training evaluation costs minutes)
    config["trainer"]["callbacks"] = [c for c in config["trainer"].get("callbacks") or []
                                      if args.monitors and not c["class_path"].endswith("ModelCheckpoint")]
    extra = (QUICK if args.quick else []) + list(args.set)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        cli = cli_main(["fit", "--config", str(path), "--trainer.enable_checkpointing", "false",
                        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", tmp, *extra])
        train_s = time.perf_counter() - start
        curve = learning_curve(cli.trainer)
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            cli.trainer.save_checkpoint(Path(args.keep) / f"{method}_{env}.ckpt")
            (Path(args.keep) / f"{method}_{env}.json").write_text(json.dumps(
                {"train_s": train_s, "curve": curve, "train_env_steps": len(cli.datamodule.buffer)}))
    model, data = cli.model, cli.datamodule
    return {**evaluate_learner(method, model, data.env_id, data.env_kwargs, data.past_window, data.future_window,
                               len(data.buffer), train_s, curve, args), "overrides": list(args.set)}


def evaluate_learner(method: str, model, env_id: str, env_kwargs, past_window: int, future_window: int,
                     train_env_steps: int, train_s: float, curve: list, args) -> dict:
    """Test-split episodes with (adaptive learners) and without online adaptation."""
    mpc = eval_mpc(dict(model.mpc), args)
    length = 100 if args.quick else args.episode_length
    rows = {}
    for adapt in ([True, False] if method not in NON_ADAPTIVE else [False]):
        start = time.perf_counter()
        result = evaluate(model, env_id, "test", episodes=args.episodes, episode_length=length,
                          env_kwargs=env_kwargs, n_envs=min(args.episodes, 5), past_window=past_window,
                          future_window=future_window, adapt=adapt, seed=args.eval_seed, **mpc)
        result["eval_s"] = time.perf_counter() - start
        rows["adapt" if adapt else "no_adapt"] = result
        print(f"{env_id} {method} adapt={adapt}: return {result['mean_return']:.1f} +- {result['ci95']:.1f}, "
              f"pred error {result['pred_error_pre']:.4f} -> {result['pred_error_post']:.4f}, "
              f"{result['planner_ms_per_step']:.0f} ms/step", flush=True)
    return {"train_env_steps": train_env_steps, "train_s": train_s, "mpc": mpc, "eval_seed": args.eval_seed,
            "curve": curve, **rows}


def print_by_task(results: dict) -> None:
    """Each arm's returns split by the episodes' task (their task vectors at the start; results written before
    ``tasks`` was recorded, and pooled runs, are left out; so are arms with one task, or a task per episode, as the
    pier's sampled dampings: nothing to group): where the mean hides one task's failure."""
    rows = []
    for env, by_method in results.items():
        for method, r in by_method.items():
            for arm in ("adapt", "no_adapt"):
                tasks = r.get(arm, {}).get("tasks") if not r.get("runs") else None
                distinct = sorted({tuple(t) for t in tasks or []})
                if not 2 <= len(distinct) < len(tasks or []):
                    continue
                returns = np.array(r[arm]["returns"])
                for task in distinct:
                    x = returns[[tuple(t) == task for t in tasks]]
                    rows.append(f"{env:<22} {method:<15} {'yes' if arm == 'adapt' else 'no':<5} "
                                f"{np.array2string(np.array(task), precision=2, separator=','):<30} "
                                f"{x.mean():>9.1f} +- {ci95(x):<6.1f} {len(x):>3}")
    if rows:
        print(f"\nby task (the task vector at each episode's start)\n{'env':<22} {'method':<15} {'adapt':<5} "
              f"{'task vector':<30} {'return':>18} {'n':>3}")
        print("\n".join(rows))


def variant(result: dict) -> str:
    """What a run's ``--set`` overrides changed besides the training seed, as a label suffix (``""`` for none):
    ``['--seed_everything', '2', '--data.init_args.action_noise', '0.3']`` -> ``" [action_noise=0.3]"``."""
    tokens, pairs = list(result.get("overrides") or []), []
    while tokens:
        key = tokens.pop(0)
        value = tokens.pop(0) if "=" not in key and tokens and not tokens[0].startswith("--") else ""
        key, _, inline = key.partition("=")
        if key.lstrip("-") != "seed_everything":
            pairs.append(f"{key.rsplit('.', 1)[-1].lstrip('-')}={inline or value}")
    return f" [{', '.join(pairs)}]" if pairs else ""


def pool_runs(runs: list[tuple[str, dict]]) -> dict:
    """One method's result from several ``--json`` files (runs with other training seeds, say): alone, the run as it
    is; else each arm's ``mean_return`` is the mean of the runs' means with a 95% CI across runs (Student's t with
    runs - 1 degrees of freedom: the spread between training runs, not between episodes), the other figures their
    means, and ``runs`` keeps ``[(label, run), ...]`` for the table's per-run rows. Runs evaluated with different
    planner settings or arms are refused: their returns do not pool."""
    if len(runs) == 1:
        return runs[0][1]
    from scipy import stats

    first_label, first = runs[0]
    for label, r in runs[1:]:
        if r.get("mpc") != first.get("mpc") or set(r) & {"adapt", "no_adapt"} != set(first) & {"adapt", "no_adapt"}:
            raise SystemExit(f"--load: {label} and {first_label} hold the same method under different planner "
                             f"settings or arms ({r.get('mpc')} vs {first.get('mpc')}): load them separately")
    n = len(runs)
    pooled = {"train_env_steps": int(np.mean([r["train_env_steps"] for _, r in runs])),
              "train_s": float(np.mean([r["train_s"] for _, r in runs])), "mpc": first.get("mpc"), "curve": [],
              "runs": runs}
    for arm in ("adapt", "no_adapt"):
        if arm not in first:
            continue
        means = np.array([r[arm]["mean_return"] for _, r in runs])
        pooled[arm] = {
            "mean_return": float(means.mean()),
            "ci95": float(stats.t.ppf(0.975, n - 1) * means.std(ddof=1) / np.sqrt(n)),
            "returns": means.tolist(),  # one per run
            **{k: float(np.mean([r[arm][k] for _, r in runs]))
               for k in ("pred_error_pre", "pred_error_post", "eval_s", "planner_ms_per_step")}}
    return pooled


def learning_curve(trainer) -> list[list[float]]:
    """``[[train env steps, held-out mean return, its ci95], ...]`` logged by DynamicsMonitor during training
    (``--monitors``; the CSV logger's file), empty without them."""
    import csv

    log_dir = getattr(trainer.logger, "log_dir", None)
    path = Path(log_dir) / "metrics.csv" if log_dir else None
    if path is None or not path.is_file():
        return []
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("rollout/test_mean_return") and r.get("rollout/train_env_steps")]
    return [[float(r["rollout/train_env_steps"]), float(r["rollout/test_mean_return"]),
             float(r.get("rollout/test_return_ci95") or "nan")] for r in rows]


def json_dict(text: str) -> dict:
    """``--mpc``'s value: a JSON object, or a clear error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({err}); e.g. '{{\"planner\": \"mppi\"}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} must be a JSON object of MPCController arguments, e.g. "
                                         f"'{{\"planner\": \"mppi\", \"planner_kwargs\": {{\"iterations\": 3}}}}'")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=None, choices=ENVS,
                        help="default halfcheetah_crippled; with --full all three")
    parser.add_argument("--methods", nargs="+", default=list(METHODS + REFERENCES), choices=METHODS + REFERENCES,
                        help="learners, and the references: 'true' (the same planner on the true MuJoCo dynamics) "
                             "and 'random' (uniform random actions)")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--episode-length", type=int, default=1000)
    parser.add_argument("--eval-seed", type=int, default=1234,
                        help="seed of the test episodes (tasks, start states, planner); another value gives fresh "
                             "episodes, e.g. to re-evaluate --checkpoints on episodes no choice was made on")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny budget and short episodes (smoke test)")
    size.add_argument("--full", action="store_true", help="every env of the comparison (%s)" % ", ".join(ENVS))
    parser.add_argument("--set", nargs=argparse.REMAINDER, default=[],
                        help="train.py overrides for every config, last on the line, e.g. --set "
                             "--model.init_args.mpc '{\"n_candidates\": 200}' --trainer.max_epochs 4")
    parser.add_argument("--plot", default=None, help="bar chart (default docs/rl_returns.png; a temp file with --quick)")
    parser.add_argument("--json", default=None, help="also write the results here (after each env)")
    parser.add_argument("--load", nargs="+", default=None,
                        help="only print and plot these --json files, merged; a method in several files (other "
                             "training seeds): a row per file and their mean +- 95%% CI across runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--eval-candidates", type=int, default=None,
                        help="planner candidates at evaluation (default: the config's mpc.n_candidates)")
    parser.add_argument("--keep", default=None, help="save each trained learner's checkpoint in this folder "
                        "({method}_{env}.ckpt; for benchmarks/model_quality.py)")
    parser.add_argument("--mpc", type=json_dict, default={},
                        help="planner settings at evaluation for every arm (the true-dynamics one included), over "
                             "the configs' mpc, as JSON: e.g. '{\"planner\": \"mppi\", \"planner_kwargs\": "
                             "{\"iterations\": 3}}' (MPCController arguments)")
    parser.add_argument("--checkpoints", default=None,
                        help="evaluate the checkpoints an earlier run kept here (--keep DIR) instead of training")
    parser.add_argument("--monitors", action="store_true",
                        help="keep the configs' callbacks (DynamicsMonitor evaluates during training: slower)")
    args = parser.parse_args()
    try:  # a wrong key fails now, not after training; planner_kwargs without a planner: checked at evaluation
        check_mpc(args.mpc if "planner" in args.mpc else {k: v for k, v in args.mpc.items() if k != "planner_kwargs"},
                  where="--mpc")
    except ValueError as err:
        parser.error(str(err))
    if args.quick:
        args.episodes = min(args.episodes, 2)
    args.envs = args.envs or (list(ENVS) if args.full else ["halfcheetah_crippled"])
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    if args.load:
        runs: dict = {}  # env -> method -> [(file stem, result), ...]
        for path in args.load:
            for env, by_method in json.loads(Path(path).read_text()).items():
                for method, r in by_method.items():  # runs of one method with other settings: rows apart
                    runs.setdefault(env, {}).setdefault(method + variant(r), []).append((Path(path).stem, r))
        results = {env: {m: pool_runs(rs) for m, rs in by_method.items()} for env, by_method in runs.items()}
    else:
        results = {}
        for env in args.envs:
            results[env] = {}
            for m in args.methods:
                if m not in REFERENCES and not (REPO / "configs" / f"{m}_{env}.yaml").is_file():
                    print(f"{env} {m}: skipped, no configs/{m}_{env}.yaml", flush=True)
                    continue
                results[env][m] = run(m, env, args)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"{'env':<22} {'method':<15} {'adapt':<5} {'return':>18} {'pred err pre':>13} {'post':>8} "
          f"{'train steps':>11} {'train s':>8} {'eval s':>7} {'ms/step':>8}")
    for env, by_method in results.items():
        for method, r in by_method.items():
            for arm in ("adapt", "no_adapt"):
                if arm not in r:
                    continue
                rows = [("  " + label, method, run_r) for label, run_r in r.get("runs", [])]  # per run, then pooled
                rows.append((env, f"{method} ({len(r['runs'])} runs)" if r.get("runs") else method, r))
                for first, name, row in rows:
                    e = row[arm]
                    print(f"{first:<22} {name:<15} {'yes' if arm == 'adapt' else 'no':<5} "
                          f"{e['mean_return']:>9.1f} +- {e['ci95']:<6.1f} {e['pred_error_pre']:>13.4f} "
                          f"{e['pred_error_post']:>8.4f} {row['train_env_steps']:>11,} {row['train_s']:>8.0f} "
                          f"{e['eval_s']:>7.0f} {e['planner_ms_per_step']:>8.0f}")
    print_by_task(results)
    plot = Path(args.plot) if args.plot else (Path(tempfile.gettempdir()) / "rl_returns.png" if args.quick
                                              else REPO / "docs" / "rl_returns.png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3), squeeze=False)
    for ax, (env, by_method) in zip(axes[0], results.items()):
        labels, means, cis = [], [], []
        for method, r in by_method.items():
            for arm in ("adapt", "no_adapt"):
                if arm in r:
                    base = method.split(" ")[0]  # without its variant
                    labels.append(method.replace(" [", "\n[") + ("" if arm == "adapt" or base in NON_ADAPTIVE + REFERENCES
                                                                 else "\n(no adapt)")
                                  + (f"\n{len(r['runs'])} runs" if r.get("runs") else ""))
                    means.append(r[arm]["mean_return"])
                    cis.append(r[arm]["ci95"])
                    if r.get("runs"):  # pooled: each run's mean as a dot on its bar
                        ax.plot([len(labels) - 1] * len(r["runs"]), r[arm]["returns"], "k.", ms=4, zorder=3)
        ax.bar(range(len(labels)), means, yerr=cis, capsize=3)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(env, fontsize=9)
        ax.set_ylabel("test-task return")
    fig.tight_layout()
    fig.savefig(plot, dpi=100)
    print(f"plot: {plot}")
    if any(r.get("curve") for by_method in results.values() for r in by_method.values()):
        curve_plot = plot.with_name(plot.stem.replace("rl_returns", "rl_sample_efficiency") + plot.suffix)
        if curve_plot == plot:
            curve_plot = plot.with_name(plot.stem + "_curves" + plot.suffix)
        sample_efficiency_plot(results, curve_plot)
        print(f"sample-efficiency plot: {curve_plot}")


def sample_efficiency_plot(results: dict, path: Path) -> None:
    """Held-out return vs training env steps (DynamicsMonitor's points, --monitors) per learner, with the final
    evaluation as the last point and the true-dynamics planner and random actions as horizontal lines."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for ax, (env, by_method) in zip(axes[0], results.items()):
        for method, r in by_method.items():
            if method in REFERENCES:
                e = r["no_adapt"]
                ax.axhline(e["mean_return"], ls="--" if method == "true" else ":", color="k" if method == "true" else "0.5",
                           lw=1, label=f"{'true dynamics' if method == 'true' else 'random actions'} "
                                       f"({e['mean_return']:.0f})")
                continue
            final = r.get("adapt") or r.get("no_adapt")
            # the monitor's 2-episode points during training, then the final 10-episode evaluation
            points = [(x, y, c) for x, y, c in r.get("curve", []) if x < r["train_env_steps"]] + [
                (r["train_env_steps"], final["mean_return"], final["ci95"])]
            x, y, c = (np.array(v) for v in zip(*points))
            line = ax.plot(x, y, marker="o", ms=3, label=method)[0]
            ax.errorbar(x[-1:], y[-1:], yerr=c[-1:], color=line.get_color(), capsize=3)
        ax.set_xlabel("training env steps")
        ax.set_ylabel("held-out return (300 steps)")
        ax.set_title(f"{env} (points: 2 episodes; last: 10 episodes +- 95% CI)", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
