"""Logging overhead of lit_meta.callbacks: training step time of a short iMAML fit with and without them.

What it measures: IMAML on Omniglot 5-way 1-shot as configs/imaml_omniglot_5w1s_quick.yaml (Conv4 with 32
channels, 8 GD inner steps, 5 CG steps, meta-batch 8, 5 queries per class, ``log_every_n_steps=10``), fitted
for ``--steps`` meta-updates with the same logger in both arms. "without": no lit_meta callbacks; "with":
``RunSummary`` + ``MetaLearningMonitor`` at their default settings (as every config uses them). The step time
is the wall time between consecutive ``on_train_batch_start`` hooks (data, step, every callback and the logger's
write), median over the steps after ``--warmup``. Both arms run in ONE process, ``--repeats`` times, taking
turns (the order flips each repeat) so background load hits them alike. Validation is off (media are made at
validation only, every ``media_every_n_val`` validation runs: their cost is per validation run, printed
separately by ``--with-val``).

Because step times of separate fits move with the machine's load (and the W&B service process competes for the
same cores in both arms), the script also times the callbacks' own hooks directly ("hooks ms/step": wall time
spent inside every hook of RunSummary + MetaLearningMonitor during training, per step). The A/B difference adds
what the hooks cause elsewhere (the extra scalars written by the logger).

Target (reported, never enforced): overhead < 5% of the step time; a WARNING line if missed.

    python benchmarks/callback_overhead.py                  # CSVLogger, 60 steps x 3 repeats
    python benchmarks/callback_overhead.py --logger wandb   # offline WandbLogger in both arms
    python benchmarks/callback_overhead.py --quick          # smoke test: tiny net, few steps

Data: $LIT_META_DATA/omniglot (default ../shared/data/omniglot, from the repository root).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402


class StepTimer(Callback):
    """Wall time between consecutive training batch starts (the whole iteration, other callbacks included)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])][warmup:]


class HookClock:
    """Wraps every hook of some callbacks with a wall-clock timer (total seconds spent inside them)."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.seconds = 0.0
        for callback in callbacks:
            for name in dir(Callback):
                if (name.startswith("on_") or name in ("setup", "teardown")) and callable(getattr(callback, name)):
                    setattr(callback, name, self._timed(getattr(callback, name)))

    def _timed(self, hook):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def fit(args, data, with_callbacks: bool, folder: Path) -> tuple[float, float]:
    from lit_meta import IMAML, Conv4
    from lit_meta.callbacks import MetaLearningMonitor, RunSummary

    L.seed_everything(0, verbose=False)
    model = IMAML(Conv4(out_features=5, hidden=args.hidden), lam=2.0, inner_steps=args.inner_steps, inner_lr=0.1,
                  cg_steps=5)
    timer = StepTimer()
    ours = [RunSummary(check_network=False), MetaLearningMonitor()] if with_callbacks else []
    clock = HookClock(ours)
    callbacks = [timer] + ours
    if args.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project="lit-meta-bench", save_dir=str(folder), offline=True)
    else:
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(folder, name="bench")
    trainer = L.Trainer(max_steps=args.steps, limit_val_batches=2 if args.with_val else 0,
                        val_check_interval=args.steps // 2 if args.with_val else None,
                        check_val_every_n_epoch=None if args.with_val else 1,
                        log_every_n_steps=10, logger=logger, callbacks=callbacks, default_root_dir=folder,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, data)
    if args.logger == "wandb":
        logger.experiment.finish()
    return statistics.median(timer.step_times(args.warmup)), clock.seconds / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--inner-steps", type=int, default=8)
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--logger", choices=["csv", "wandb"], default="csv")
    parser.add_argument("--with-val", action="store_true", help="validate twice per fit (media cost included)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke test: hidden 8, 3 inner steps, 20 steps, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats, args.hidden, args.inner_steps, args.meta_batch = 20, 3, 1, 8, 3, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lit_meta.callbacks").setLevel(logging.WARNING)

    from lit_meta.datamodules import OmniglotDataModule

    data_root = Path(os.environ.get("LIT_META_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    data = OmniglotDataModule(data_dir=str(data_root / "omniglot"), n_way=5, k_shot=1, k_query=5,
                              meta_batch_size=args.meta_batch, steps_per_epoch=10_000, eval_episodes=20,
                              eval_meta_batch_size=10)
    print(machine_line())
    print(f"iMAML Omniglot 5w1s, Conv4 hidden {args.hidden}, {args.inner_steps} inner steps, 5 CG steps, "
          f"meta-batch {args.meta_batch}, logger {args.logger}, {args.steps} steps (median after {args.warmup})"
          f"{', validation x2' if args.with_val else ''}")
    results: dict[bool, list[float]] = {False: [], True: []}
    hooks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("WANDB_DIR", tmp)
        for repeat in range(args.repeats):
            for arm in ((False, True) if repeat % 2 == 0 else (True, False)):
                step, hook = fit(args, data, arm, Path(tmp) / f"r{repeat}_{int(arm)}")
                results[arm].append(step)
                if arm:
                    hooks.append(hook)
    print(f"{'repeat':>6} {'without ms/step':>16} {'with ms/step':>13} {'A/B overhead':>13} {'hooks ms/step':>14} "
          f"{'hooks %':>8}")
    for i, (a, b, h) in enumerate(zip(results[False], results[True], hooks)):
        print(f"{i:>6} {1000 * a:>16.1f} {1000 * b:>13.1f} {100 * (b / a - 1):>12.1f}% {1000 * h:>14.3f} "
              f"{100 * h / a:>7.2f}%")
    a, b, h = statistics.median(results[False]), statistics.median(results[True]), statistics.median(hooks)
    overhead = 100 * (b / a - 1)
    print(f"{'median':>6} {1000 * a:>16.1f} {1000 * b:>13.1f} {overhead:>12.1f}% {1000 * h:>14.3f} {100 * h / a:>7.2f}%")
    if overhead >= 5:
        print(f"WARNING: A/B overhead {overhead:.1f}% >= 5% target (noisy machine? compare the hooks column, rerun "
              f"with more --repeats)")


if __name__ == "__main__":
    main()
