"""Held-out accuracy at an equal meta-training budget: iMAML-GD, iMAML-HF, MAML, FOMAML, Reptile and the fine-tune
baseline on the Omniglot data we have.

Each method runs its own config (``configs/{imaml,imaml_hf,maml,fomaml,reptile}_omniglot_5w1s.yaml``, their
inner-loop settings as they are; fine-tune: ``configs/baseline_omniglot.yaml``) with the same changes for all:
the alphabet split (``split: alphabets``: test alphabets never seen in training), ``--steps`` meta-updates of
``--meta-batch`` tasks (the same number of meta-training tasks; the same seeded task stream), ``k_query`` 5,
Conv-4 with ``--hidden`` channels, no validation or checkpoints. Then ``trainer.test`` on ``--episodes`` fixed
test episodes (600 by default): post-adaptation query accuracy, mean +- 95% CI (1.96 standard errors over the
episodes), and the pre-adaptation accuracy. The fine-tune baseline meta-learns nothing: each test task is
trained from the initial weights on its support set.

    python benchmarks/accuracy_budget.py                    # 5w1s, 200 x 8 tasks, Conv-4 32 ch (minutes, 2 cores)
    python benchmarks/accuracy_budget.py --quick            # smoke: 10 steps, 40 episodes
    python benchmarks/accuracy_budget.py --full             # 2,000 x 16 tasks, Conv-4 64 ch (hours on a CPU)
    python benchmarks/accuracy_budget.py --ways 20 --shots 1

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
from common import machine_line  # noqa: E402

from lit_meta.allocator import keep_freed_memory  # noqa: E402
from lit_meta.cli import main as cli_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = {"iMAML-GD": "imaml_omniglot_5w1s", "iMAML-HF": "imaml_hf_omniglot_5w1s", "MAML": "maml_omniglot_5w1s",
           "FOMAML": "fomaml_omniglot_5w1s", "Reptile": "reptile_omniglot_5w1s", "fine-tune": "baseline_omniglot"}
PAPER = {(5, 1): {"MAML": 98.7, "iMAML-GD": 99.16, "iMAML-HF": 99.50},
         (5, 5): {"MAML": 99.9, "iMAML-GD": 99.67, "iMAML-HF": 99.74},
         (20, 1): {"MAML": 95.8, "iMAML-GD": 94.46, "iMAML-HF": 96.18},
         (20, 5): {"MAML": 98.9, "iMAML-GD": 98.69, "iMAML-HF": 99.14}}


def config_for(method: str, args, tmp: Path) -> Path:
    config = yaml.safe_load((REPO / "configs" / f"{METHODS[method]}.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(callbacks=[], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp))
    trainer.pop("val_check_interval", None)
    if method != "fine-tune":  # FineTune takes no optimizer steps: it is only tested
        trainer.update(max_steps=args.steps, check_val_every_n_epoch=1)
    model = config["model"]["init_args"]
    model["net"]["init_args"].update(hidden=args.hidden, out_features=args.ways)
    data = config["data"]["init_args"]
    data.update(n_way=args.ways, k_shot=args.shots, k_query=5, split="alphabets", meta_batch_size=args.meta_batch,
                steps_per_epoch=max(args.steps, 1), eval_episodes=args.episodes, eval_meta_batch_size=20)
    data["data_dir"] = str(Path(os.environ.get("LIT_META_DATA", REPO.parent / "shared" / "data")) / "omniglot")
    path = tmp / f"{METHODS[method]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(method: str, args, tmp: Path) -> dict:
    cli = cli_main(["--config", str(config_for(method, args, tmp))], run=False)
    start = time.perf_counter()
    if method != "fine-tune":
        cli.trainer.fit(cli.model, cli.datamodule)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = cli.trainer.test(cli.model, cli.datamodule, verbose=False)[0]
    return {"acc": metrics["test/query_acc"], "ci95": metrics["test/query_acc_ci95"],
            "pre_acc": metrics.get("test/pre_query_acc", float("nan")), "train_s": train_s,
            "test_s": time.perf_counter() - start, "tasks": 0 if method == "fine-tune" else args.steps * args.meta_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200, help="meta-updates per method")
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=32, help="Conv-4 channels")
    parser.add_argument("--episodes", type=int, default=600, help="test episodes (multiple of 20)")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    print(machine_line(malloc_kept=keep_freed_memory()))
    print(f"Omniglot (minimal, 242 characters) {args.ways}-way {args.shots}-shot, alphabet split, Conv-4 "
          f"{args.hidden} ch, {args.steps} meta-updates x {args.meta_batch} tasks each, {args.episodes} test episodes")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            results[method] = run(method, args, Path(tmp))
            r = results[method]
            print(f"{method}: {100 * r['acc']:.2f} +- {100 * r['ci95']:.2f} (pre {100 * r['pre_acc']:.2f}), "
                  f"train {r['train_s']:.0f} s, test {r['test_s']:.0f} s", flush=True)
    paper = PAPER.get((args.ways, args.shots), {})
    print(f"\n{'method':<10} {'meta-train tasks':>16} {'test acc %':>16} {'before adapt %':>15} {'train s':>8} "
          f"{'paper % (full Omniglot)':>24}")
    for method, r in results.items():
        print(f"{method:<10} {r['tasks']:>16,} {100 * r['acc']:>8.2f} +- {100 * r['ci95']:<5.2f} "
              f"{100 * r['pre_acc']:>15.2f} {r['train_s']:>8.0f} {paper.get(method, '-'):>24}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(results)
    ax.bar(range(len(names)), [100 * results[m]["acc"] for m in names],
           yerr=[100 * results[m]["ci95"] for m in names], capsize=3)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"Omniglot (minimal) {args.ways}w{args.shots}s, {args.steps * args.meta_batch} meta-training tasks, "
                 f"{args.episodes} test episodes", fontsize=8)
    fig.tight_layout()
    plot = args.plot if not args.quick else Path(tempfile.gettempdir()) / "accuracy_budget_quick.png"
    fig.savefig(plot, dpi=100)
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
