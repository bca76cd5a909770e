"""Peak memory of one meta-gradient vs inner steps: iMAML stays flat, MAML grows linearly.

Each cell runs in a FRESH process (peak RSS cannot be reset inside one), computes one meta-gradient
of an Omniglot 5-way 1-shot meta-batch (5 queries per class) with the Conv-4 net, and reports the
peak resident memory above what the process held just before (data, model and torch loaded).
On a GPU (``--device cuda``) it reports ``torch.cuda.max_memory_allocated`` instead. A second table
shows memory and tasks/s against ``task_chunk_size`` for iMAML.

    python benchmarks/memory_vs_inner_steps.py             # meta-batch 8, ~3 minutes on 2 cores
    python benchmarks/memory_vs_inner_steps.py --full      # meta-batch 32

Claim: iMAML peak memory at 100 inner steps <= 1.1x that at 5. Writes docs/memory_vs_inner_steps.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def cell(method: str, steps: int, meta_batch: int, chunk: int | None, device: str) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from lit_meta import IMAML, MAML, Conv4
    from lit_meta.datamodules import OmniglotDataModule
    from lit_meta.episode import to_float

    data_dir = Path(os.environ.get("LIT_META_DATA", REPO.parent / "shared" / "data")) / "omniglot"
    with tempfile.TemporaryDirectory() as cache:
        dm = OmniglotDataModule(data_dir=str(data_dir), cache_dir=cache, n_way=5, k_shot=1, k_query=5,
                                meta_batch_size=meta_batch)
        dm.setup()
        episode = to_float(dm.dataset("train")[(0, 0)])
    episode = type(episode)(*(t.to(device) for t in episode))
    torch.manual_seed(0)
    net = Conv4(out_features=5)
    model = (IMAML(net, lam=2.0, inner_steps=steps, inner_lr=0.1, cg_steps=5, task_chunk_size=chunk)
             if method == "imaml" else MAML(net, inner_steps=steps, inner_lr=0.1, task_chunk_size=chunk)).to(device)
    model._chunked_task_meta_grads(type(episode)(*(t[:1] for t in episode)))  # warm-up: kernels, allocator
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mib()
    start = time.perf_counter()
    model._chunked_task_meta_grads(episode)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = time.perf_counter() - start
    return {"method": method, "steps": steps, "chunk": chunk, "peak_mib": peak - base,
            "tasks_per_s": meta_batch / seconds}


def run_cell(method: str, steps: int, meta_batch: int, chunk: int | None, device: str) -> dict:
    args = [sys.executable, __file__, "--cell", json.dumps([method, steps, meta_batch, chunk, device])]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="meta-batch 32 (default 8)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", default="5,10,25,50,100")
    parser.add_argument("--maml-max-steps", type=int, default=50, help="skip MAML above this (its memory grows)")
    parser.add_argument("--chunks", default=None,
                        help="task_chunk_size values of the second table (default 1,2,4,meta-batch/2,meta-batch)")
    parser.add_argument("--chunk-steps", type=int, default=16, help="inner steps of the second table (default 16)")
    parser.add_argument("--plot", default=str(REPO / "docs" / "memory_vs_inner_steps.png"))
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(cell(*json.loads(args.cell))))
        return
    from common import machine_line

    meta_batch = 32 if args.full else 8
    steps = [int(s) for s in args.steps.split(",")]
    sizes = ([int(c) for c in args.chunks.split(",")] if args.chunks else [1, 2, 4, meta_batch // 2, meta_batch])
    if min(sizes) < 1 or args.chunk_steps < 1:
        parser.error(f"task_chunk_size values {sizes} (--chunks) and --chunk-steps {args.chunk_steps} must be >= 1")
    print(machine_line())
    print(f"Omniglot 5w1s, 5 queries/class, Conv-4 (64 ch), meta-batch {meta_batch}, device {args.device}; "
          f"peak memory above the process's baseline, one fresh process per cell")
    print(f"{'method':>8} {'inner steps':>11} {'peak MiB':>9} {'tasks/s':>8}")
    rows = []
    for method in ("imaml", "maml"):
        for s in steps:
            if method == "maml" and s > args.maml_max_steps:
                continue
            r = run_cell(method, s, meta_batch, None, args.device)
            rows.append(r)
            print(f"{method:>8} {s:>11} {r['peak_mib']:>9.0f} {r['tasks_per_s']:>8.1f}")
    imaml = {r["steps"]: r["peak_mib"] for r in rows if r["method"] == "imaml"}
    if min(steps) in imaml and max(steps) in imaml:
        ratio = imaml[max(steps)] / imaml[min(steps)]
        print(f"iMAML peak at {max(steps)} / at {min(steps)} inner steps: {ratio:.2f}x (target <= 1.1x)")
    print(f"\n{'task_chunk_size':>15} {'peak MiB':>9} {'tasks/s':>8}   (iMAML, {args.chunk_steps} inner steps)")
    chunks = []
    for chunk in sorted(set(sizes)):
        r = run_cell("imaml", args.chunk_steps, meta_batch, chunk, args.device)
        chunks.append(r)
        print(f"{chunk:>15} {r['peak_mib']:>9.0f} {r['tasks_per_s']:>8.1f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for method in ("imaml", "maml"):
        pts = [(r["steps"], r["peak_mib"]) for r in rows if r["method"] == method]
        a.plot(*zip(*pts), marker="o", label={"imaml": "iMAML-GD", "maml": "MAML (2nd order)"}[method])
    a.set_xlabel("inner steps")
    a.set_ylabel("peak memory above baseline (MiB)")
    a.set_title(f"one meta-gradient, meta-batch {meta_batch}")
    a.legend()
    b.plot([r["chunk"] for r in chunks], [r["peak_mib"] for r in chunks], marker="o", label="peak MiB")
    b.set_xscale("log", base=2)
    b.set_xlabel("task_chunk_size")
    b.set_ylabel("peak MiB")
    b2 = b.twinx()
    b2.plot([r["chunk"] for r in chunks], [r["tasks_per_s"] for r in chunks], marker="s", color="C1")
    b2.set_ylabel("tasks/s", color="C1")
    b.set_title(f"iMAML, {args.chunk_steps} inner steps")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
