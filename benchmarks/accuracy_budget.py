"""Held-out accuracy at an equal meta-training budget: iMAML-GD, iMAML-released, iMAML-HF, MAML, FOMAML, Reptile
and the fine-tune baseline on the Omniglot data we have, over one or more seeds, with an optional learning curve.

``iMAML-GD`` and ``iMAML-released`` both run the authors' released recipe (the iMAML configs' setting, see
docs/accuracy_budget.md); ``iMAML-HF`` runs the paper's proximal system with Hessian-free inner steps.

Each method runs its own config (``configs/{imaml,imaml_hf,maml,fomaml,reptile}_omniglot_5w1s.yaml``, iMAML-released:
``configs/imaml_omniglot_5w1s_released.yaml``, their inner-loop settings as they are; fine-tune:
``configs/baseline_omniglot.yaml``) with the same changes for all: the alphabet split (``split: alphabets``: test
alphabets never seen in training), ``--steps`` meta-updates of ``--meta-batch`` tasks (the same number of
meta-training tasks; the same seeded task stream), ``k_query`` 5, Conv-4 with ``--hidden`` channels (default 32, the
README's figures; the paper's Conv-4 has 64: ``--hidden 64``), no validation or checkpoints. Then ``trainer.test``
on ``--episodes`` fixed test episodes (600 by default): post-adaptation query accuracy, mean +- 95% CI (1.96
standard errors over the episodes), and the pre-adaptation accuracy. The fine-tune baseline meta-learns nothing:
each test task is trained from the initial weights on its support set.

``--seeds 0 1 2``: every method runs once per seed (``seed_everything``: the initial weights and the episode
stream, training and test episodes, the same for every method under one seed). Each run prints its accuracy with
its 95% CI over episodes; each method then its mean, standard deviation (ddof 1) and min-max across seeds (one
seed's CI says nothing of the spread between seeds). The json and the plot hold every run.

    python benchmarks/accuracy_budget.py                    # 5w1s, 200 x 8 tasks, Conv-4 32 ch (minutes, 2 cores)
    python benchmarks/accuracy_budget.py --quick            # smoke: 10 steps, 40 episodes
    python benchmarks/accuracy_budget.py --full             # 2,000 x 16 tasks, Conv-4 64 ch (hours on a CPU)
    python benchmarks/accuracy_budget.py --ways 20 --shots 1
    python benchmarks/accuracy_budget.py --methods iMAML-GD iMAML-released MAML --hidden 64 --seeds 0 1 2
    python benchmarks/accuracy_budget.py --methods iMAML-GD MAML FOMAML --hidden 64 --steps 2500 \
        --curve-every 250 --save-dir runs/budget            # 20,000 tasks, held-out curve, checkpoints kept

Learning curve (``--curve-every N``): every N meta-updates, the post-adaptation accuracy on ``--curve-episodes``
fixed episodes of the validation alphabet (never trained on, never tested on), mean +- 95% CI; plotted against
meta-training tasks (``docs/accuracy_budget_curve.png`` by default). ``--save-dir``: each run's config and final
checkpoint stay there, with the ``train.py test`` command that re-measures the checkpoint.

Data: the minimal Omniglot background splits ($LIT_META_DATA/omniglot, default ../shared/data/omniglot), 242
characters, not the paper's 1,623; state that beside the paper's figures. Writes docs/accuracy_budget.png
(``--plot``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, save_figure  # noqa: E402

from lightning.pytorch.callbacks import Callback  # noqa: E402

from lit_meta.allocator import keep_freed_memory  # noqa: E402
from lit_meta.cli import main as cli_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = {"iMAML-GD": "imaml_omniglot_5w1s", "iMAML-released": "imaml_omniglot_5w1s_released",
           "iMAML-HF": "imaml_hf_omniglot_5w1s", "MAML": "maml_omniglot_5w1s", "FOMAML": "fomaml_omniglot_5w1s",
           "Reptile": "reptile_omniglot_5w1s", "fine-tune": "baseline_omniglot"}
PAPER = {(5, 1): {"MAML": 98.7, "iMAML-GD": 99.16, "iMAML-HF": 99.50},
         (5, 5): {"MAML": 99.9, "iMAML-GD": 99.67, "iMAML-HF": 99.74},
         (20, 1): {"MAML": 95.8, "iMAML-GD": 94.46, "iMAML-HF": 96.18},
         (20, 5): {"MAML": 98.9, "iMAML-GD": 98.69, "iMAML-HF": 99.14}}


def config_for(method: str, args, tmp: Path, seed: int) -> Path:
    config = yaml.safe_load((REPO / "configs" / f"{METHODS[method]}.yaml").read_text())
    config["seed_everything"] = seed  # the initial weights and, the data seed left unset, the episode stream
    trainer = config["trainer"]
    trainer.update(callbacks=[], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp))
    trainer.pop("val_check_interval", None)
    if method != "fine-tune":  # FineTune takes no optimizer steps: it is only tested
        trainer.update(max_steps=args.steps, check_val_every_n_epoch=1)
        if args.curve_every:  # held-out points every curve_every meta-updates, curve_episodes // 20 batches of 20
            trainer.update(val_check_interval=args.curve_every, check_val_every_n_epoch=None,
                           limit_val_batches=args.curve_episodes // 20)
    model = config["model"]["init_args"]
    model["net"]["init_args"].update(hidden=args.hidden, out_features=args.ways)
    data = config["data"]["init_args"]
    data.pop("seed", None)  # episodes follow seed_everything
    data.update(n_way=args.ways, k_shot=args.shots, k_query=5, split="alphabets", meta_batch_size=args.meta_batch,
                steps_per_epoch=max(args.steps, 1), eval_episodes=args.episodes, eval_meta_batch_size=20)
    data["data_dir"] = str(Path(os.environ.get("LIT_META_DATA", REPO.parent / "shared" / "data")) / "omniglot")
    path = tmp / f"{method}_{args.ways}w{args.shots}s_seed{seed}.yaml"  # e.g. MAML_20w1s_seed0.yaml
    path.write_text(yaml.safe_dump(config))
    return path


class LearningCurve(Callback):
    """Records ``(meta-training tasks, val/query_acc, its 95% CI)`` after every validation run of a fit."""

    def __init__(self, meta_batch: int) -> None:
        self.meta_batch, self.points = meta_batch, []

    def on_validation_end(self, trainer, pl_module) -> None:  # after the learner logged the epoch
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.points.append([trainer.global_step * self.meta_batch, float(metrics["val/query_acc"]),
                            float(metrics["val/query_acc_ci95"])])


def run(method: str, args, tmp: Path, seed: int) -> dict:
    folder = args.save_dir or tmp
    config = config_for(method, args, folder, seed)
    cli = cli_main(["--config", str(config)], run=False)
    curve = LearningCurve(args.meta_batch)
    cli.trainer.callbacks.append(curve)
    start = time.perf_counter()
    if method != "fine-tune":
        cli.trainer.fit(cli.model, cli.datamodule)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = cli.trainer.test(cli.model, cli.datamodule, verbose=False)[0]
    result = {"seed": seed, "acc": metrics["test/query_acc"], "ci95": metrics["test/query_acc_ci95"],
              "pre_acc": metrics.get("test/pre_query_acc", float("nan")), "train_s": train_s,
              "test_s": time.perf_counter() - start, "curve": curve.points}
    if args.save_dir:
        checkpoint = config.with_suffix(".ckpt")
        cli.trainer.save_checkpoint(checkpoint)
        result["test_command"] = f"python train.py test --config {config} --ckpt_path {checkpoint}"
    return result


def summary(runs: list[dict]) -> dict:
    """Mean, standard deviation (ddof 1; 0 for one run), min and max of the runs' accuracies across seeds."""
    accs = [r["acc"] for r in runs]
    mean = sum(accs) / len(accs)
    std = (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if len(accs) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(accs), "max": max(accs),
            "train_s": sum(r["train_s"] for r in runs) / len(runs)}


def meta_training_tasks(method: str, args) -> int:
    return 0 if method == "fine-tune" else args.steps * args.meta_batch


def write_json(args, runs: dict[str, list[dict]]) -> None:
    """``--json``: the settings, and per method its runs (seed, accuracy, CI, times) and their summary."""
    if not args.json:
        return
    Path(args.json).write_text(json.dumps({
        "settings": {"ways": args.ways, "shots": args.shots, "steps": args.steps, "meta_batch": args.meta_batch,
                     "hidden": args.hidden, "episodes": args.episodes, "seeds": args.seeds},
        "methods": {method: {"tasks": meta_training_tasks(method, args), **summary(rs), "runs": rs}
                    for method, rs in runs.items()},
    }, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="one run of every method per seed (seed_everything: initial weights and episodes)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200, help="meta-updates per method")
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=32, help="Conv-4 channels (the paper's: 64)")
    parser.add_argument("--episodes", type=int, default=600, help="test episodes (multiple of 20)")
    parser.add_argument("--curve-every", type=int, default=0,
                        help="meta-updates between held-out (validation alphabet) points of the learning curve; 0: none")
    parser.add_argument("--curve-episodes", type=int, default=200, help="episodes per curve point (multiple of 20)")
    parser.add_argument("--save-dir", type=Path, default=None, help="keep each run's config and final checkpoint here")
    parser.add_argument("--curve-plot", type=Path, default=REPO / "docs" / "accuracy_budget_curve.png")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "accuracy_budget.png")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.episodes, args.hidden = 10, 40, 8
    if args.full:
        args.steps, args.meta_batch, args.hidden = 2000, 16, 64
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed")
    if args.curve_every < 0 or args.curve_every > args.steps:
        parser.error(f"--curve-every {args.curve_every} must be between 0 (no curve) and --steps {args.steps}")
    if args.curve_episodes < 20 or args.curve_episodes % 20:
        parser.error(f"--curve-episodes {args.curve_episodes} must be a positive multiple of 20 (the eval batch)")
    if args.save_dir:
        args.save_dir = args.save_dir.resolve()
        args.save_dir.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    print(machine_line(malloc_kept=keep_freed_memory()))
    print(f"Omniglot (minimal, 242 characters) {args.ways}-way {args.shots}-shot, alphabet split, Conv-4 "
          f"{args.hidden} ch, {args.steps} meta-updates x {args.meta_batch} tasks each, {args.episodes} test episodes, "
          f"seeds {' '.join(map(str, args.seeds))}")
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for seed in args.seeds:
                r = run(method, args, Path(tmp), seed)
                runs.setdefault(method, []).append(r)
                write_json(args, runs)  # after every run: a long multi-seed run killed midway keeps what it measured
                print(f"{method} seed {seed}: {100 * r['acc']:.2f} +- {100 * r['ci95']:.2f} (pre "
                      f"{100 * r['pre_acc']:.2f}), train {r['train_s']:.0f} s, test {r['test_s']:.0f} s", flush=True)
                if r["curve"]:
                    print("  held-out curve (tasks: acc %): " + ", ".join(
                        f"{t:,}: {100 * a:.1f}" for t, a, _ in r["curve"]), flush=True)
                if "test_command" in r:
                    print(f"  re-test the checkpoint: {r['test_command']}", flush=True)
    stats = {method: summary(rs) for method, rs in runs.items()}
    paper = PAPER.get((args.ways, args.shots), {})
    tasks = {method: meta_training_tasks(method, args) for method in runs}
    print(f"\nper run: test acc % +- 95% CI over {args.episodes} episodes (before adaptation %)")
    print(f"{'method':<15} " + " ".join(f"{'seed ' + str(s):>24}" for s in args.seeds))
    for method, rs in runs.items():
        cells = [f"{100 * r['acc']:.2f} +- {100 * r['ci95']:.2f} ({100 * r['pre_acc']:.1f})" for r in rs]
        print(f"{method:<15} " + " ".join(f"{c:>24}" for c in cells))
    print(f"\nacross {len(args.seeds)} seed{'s' if len(args.seeds) > 1 else ''}: mean, std (ddof 1) and min-max of "
          f"the runs' accuracies")
    print(f"{'method':<15} {'meta-train tasks':>16} {'mean acc %':>10} {'std':>6} {'min-max %':>13} {'train s':>8} "
          f"{'paper % (full Omniglot)':>24}")
    for method, st in stats.items():
        spread = f"{100 * st['min']:.1f}-{100 * st['max']:.1f}"
        print(f"{method:<15} {tasks[method]:>16,} {100 * st['mean']:>10.2f} {100 * st['std']:>6.2f} {spread:>13} "
              f"{st['train_s']:>8.0f} {paper.get(method, '-'):>24}")
    write_json(args, runs)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    names = list(runs)
    several = len(args.seeds) > 1
    # bar: the mean over seeds, whisker: the std across seeds (one seed: its 95% CI over episodes); dots: the runs
    ax.bar(range(len(names)), [100 * stats[m]["mean"] for m in names], capsize=4, alpha=0.6,
           yerr=[100 * (stats[m]["std"] if several else runs[m][0]["ci95"]) for m in names],
           error_kw={"ecolor": "tab:red", "elinewidth": 2})
    for i, m in enumerate(names):
        xs = [i + 0.25 * (j / max(len(runs[m]) - 1, 1) - 0.5) for j in range(len(runs[m]))]
        ax.errorbar(xs, [100 * r["acc"] for r in runs[m]], yerr=[100 * r["ci95"] for r in runs[m]], fmt="o", ms=3,
                    color="k", elinewidth=0.8, capsize=2)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("held-out accuracy (%)")
    whisker = "std across seeds" if several else "95% CI"
    ax.set_title(f"Omniglot (minimal) {args.ways}w{args.shots}s, Conv-4 {args.hidden} ch, "
                 f"{args.steps * args.meta_batch} meta-training tasks, {args.episodes} test episodes, seeds "
                 f"{' '.join(map(str, args.seeds))}\nbar: mean over seeds +- {whisker} (red); dots: each seed +- its "
                 f"95% CI over episodes", fontsize=7)
    save_plot(fig, args, args.plot, "accuracy_budget_quick.png", "plot")
    if args.curve_every:
        plot_curve(args, runs, plt)


def plot_curve(args, runs: dict[str, list[dict]], plt) -> None:
    """Held-out (validation alphabet) accuracy against meta-training tasks, one line per run, shaded 95% CI; the
    final test accuracy as a marker at the end."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, (method, rs) in enumerate(runs.items()):
        color = f"C{i}"
        for j, r in enumerate(rs):
            if not r["curve"]:
                continue
            tasks = [t for t, _, _ in r["curve"]]
            acc = torch.tensor([100 * a for _, a, _ in r["curve"]])
            ci = torch.tensor([100 * c for _, _, c in r["curve"]])
            ax.plot(tasks, acc, "-o", ms=3, color=color, label=method if j == 0 else None)
            ax.fill_between(tasks, acc - ci, acc + ci, color=color, alpha=0.2)
            ax.errorbar([tasks[-1]], [100 * r["acc"]], yerr=[100 * r["ci95"]], fmt="s", color=color, ms=5,
                        capsize=3, mfc="none")
    ax.set_xlabel("meta-training tasks")
    ax.set_ylabel("held-out accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Omniglot (minimal) {args.ways}w{args.shots}s, Conv-4 {args.hidden} ch, meta-batch "
                 f"{args.meta_batch}: validation alphabet, {args.curve_episodes} episodes per point (line, 95% CI); "
                 f"\nsquare: the test alphabets, {args.episodes} episodes, after the last step", fontsize=7)
    save_plot(fig, args, args.curve_plot, "accuracy_budget_curve_quick.png", "curve plot")


def save_plot(fig, args, path: Path, quick_name: str, what: str) -> None:
    """Writes the figure to ``path`` (a ``--quick`` run: to ``quick_name`` in the temp folder, never docs/)."""
    save_figure(fig, path if not args.quick else Path(tempfile.gettempdir()) / quick_name, what)


if __name__ == "__main__":
    main()
