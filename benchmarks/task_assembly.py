"""Few-shot task assembly throughput: tasks/s on ONE CPU core, from the uint8 tensor cache.

Claim: the DataModule never makes a GPU wait: >= 10,000 Omniglot 5-way 1-shot tasks/s (15 queries
per class) assembled on one core, kept uint8 until the device. For comparison the same batches are
also converted to float32 on the CPU (what we avoid by converting on the device).

    python benchmarks/task_assembly.py            # default size, ~30 s
    python benchmarks/task_assembly.py --full     # more repeats and shapes

Writes docs/task_assembly.png. Data: $LIT_META_DATA/omniglot (default ../shared/data/omniglot).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from lit_meta.datamodules import ClassImageTasks, EpisodeDataset, OmniglotDataModule
from lit_meta.episode import to_float

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def tasks_per_second(dataset: EpisodeDataset, seconds: float, convert: bool) -> float:
    step, tasks, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        episode = dataset[(0, step)]
        if convert:
            episode = to_float(episode)
        tasks += episode.n_tasks
        step += 1
    return tasks / (time.perf_counter() - start)


def measure(name: str, dataset: EpisodeDataset, seconds: float) -> tuple[str, float, float]:
    tasks_per_second(dataset, 0.3, False)  # warm-up
    raw = tasks_per_second(dataset, seconds, convert=False)
    flt = tasks_per_second(dataset, seconds, convert=True)
    print(f"{name:>16} {32:>10} {raw:>14,.0f} {flt:>15,.0f}")
    return name, raw, flt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="longer runs and more shapes")
    parser.add_argument("--data-dir", default=None, help="folder with the Omniglot zips")
    parser.add_argument("--plot", default=str(REPO / "docs" / "task_assembly.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the claim is per core
    data = Path(args.data_dir or Path(os.environ.get("LIT_META_DATA", REPO.parent / "shared" / "data")) / "omniglot")
    seconds = 5.0 if args.full else 2.0
    shapes = [(5, 1, 15), (5, 5, 15), (20, 1, 15), (20, 5, 15)] if args.full else [(5, 1, 15), (20, 1, 15)]
    print(machine_line())
    print(f"{'episode (15 q/cl)':>16} {'meta_batch':>10} {'uint8 tasks/s':>14} {'float32 on CPU':>15}")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for n_way, k_shot, k_query in shapes:
            dm = OmniglotDataModule(data_dir=str(data), cache_dir=cache, n_way=n_way, k_shot=k_shot,
                                    k_query=k_query, meta_batch_size=32)
            dm.setup()
            rows.append(measure(f"{n_way}w{k_shot}s", dm.dataset("train"), seconds))
        # Full Omniglot has 1100 x 4 = 4400 training classes (the minimal data 676): class choice costs more.
        full_size = torch.zeros(4400, 20, 1, 28, 28, dtype=torch.uint8)
        rows.append(measure("5w1s, 4400 cl.", EpisodeDataset(ClassImageTasks(full_size, 5, 1, 15), 0, "train", 32, 1),
                            seconds))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r[1] for r in rows], 0.4, label="uint8 (what the loader yields)")
    ax.bar([i + 0.2 for i in x], [r[2] for r in rows], 0.4, label="+ float32 conversion on CPU")
    ax.axhline(10_000, color="k", ls="--", lw=1, label="target 10,000 tasks/s")
    ax.set_xticks(list(x), [r[0] for r in rows])
    ax.set_ylabel("tasks/s, 1 CPU core")
    ax.set_title("Omniglot task assembly (15 queries/class)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=100)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
