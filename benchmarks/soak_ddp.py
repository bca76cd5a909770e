"""Soak run: multi-process CPU DDP meta-training for a long time, memory sampled every minute (not in CI).

Runs ``train.py fit`` on ``--config`` (default: the README's quick iMAML, Omniglot 5w1s) with ``--devices``
CPU processes (DDP) for ``--minutes``, validation and checkpoints as the config has them, and samples the
resident memory (VmRSS from /proc, Linux) of every process of the run each ``--sample-s`` seconds. Reports:

- a table per sample: minute, global step, RSS of each process and in total;
- the slope of the total RSS after ``--warmup-min`` minutes (least squares, MiB/min): ~0 means no leak;
- whether the run made progress in every sample and ended on time (no hang);
- the same config with 1 process for the first ``--compare-steps`` steps: parameters at that step and the
  validation metrics (over the whole validation set, gathered from all ranks) at the same steps (DDP with W
  processes and 1 process see the same tasks: equal up to float summation order).

    python benchmarks/soak_ddp.py                        # 2 processes, 30 minutes
    python benchmarks/soak_ddp.py --minutes 3 --warmup-min 1 --compare-steps 20   # smoke

Data: ``$LIT_META_DATA`` (default ``../shared/data`` beside the repository). Writes ``--out`` (default: a temporary folder) with the runs' CSV logs, soak.json, and docs/soak.png (``--plot``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def is_python(pid: int) -> bool:
    try:
        return "python" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return False


def last_step(log_dir: Path) -> int:
    """The highest ``step`` in the run's metrics.csv (CSVLogger flushes every ``log_every_n_steps * 10``)."""
    best = -1
    for path in log_dir.rglob("metrics.csv"):
        try:
            with path.open() as f:
                for row in csv.DictReader(f):
                    if row.get("step"):
                        best = max(best, int(row["step"]))
        except (OSError, ValueError):
            continue
    return best


def metric(log_dir: Path, key: str) -> dict[int, float]:
    """``key`` by step from the run's metrics.csv."""
    out: dict[int, float] = {}
    for path in log_dir.rglob("metrics.csv"):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    out[int(row["step"])] = float(row[key])
    return out


def parameters_at(out: Path, step: int) -> dict:
    import torch

    path = next((out / "checkpoints").glob(f"*-step={step}.ckpt"))
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def run_config(args, out: Path) -> Path:
    """``--config`` with its checkpoints in ``out`` (every ``--compare-steps`` steps, all kept, for the comparison)."""
    import yaml

    config = yaml.safe_load(args.config.read_text())
    callbacks = [c for c in config["trainer"].get("callbacks") or [] if not c["class_path"].endswith("ModelCheckpoint")]
    callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"dirpath": str(out / "checkpoints"), "save_last": True, "save_top_k": -1,
                                    "every_n_train_steps": args.compare_steps}})
    config["trainer"]["callbacks"] = callbacks
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(args, devices: int, out: Path, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "train.py", "fit", "--config", str(run_config(args, out)), "--trainer.accelerator", "cpu",
               "--trainer.devices", str(devices), "--trainer.enable_progress_bar", "false",
               "--trainer.logger.init_args.save_dir", str(out), *(["--trainer.strategy", "ddp"] if devices > 1 else []),
               *extra]
    log = (out / f"train_{devices}.log").open("w")
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={"LIT_META_DATA": str(REPO.parent / "shared" / "data"), **os.environ,
                                 "WANDB_MODE": "offline"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "imaml_omniglot_5w1s_quick.yaml")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--sample-s", type=float, default=60)
    parser.add_argument("--warmup-min", type=float, default=5)
    parser.add_argument("--compare-steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "soak.png")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="lit_meta_soak_"))
    (out / "ddp").mkdir(parents=True, exist_ok=True)
    (out / "single").mkdir(parents=True, exist_ok=True)
    print(machine_line())
    print(f"soak: {args.config.name}, {args.devices} CPU processes (DDP), {args.minutes} min, sample every "
          f"{args.sample_s} s; logs in {out}")

    seconds = int(args.minutes * 60)
    limit = f"{seconds // 86400:02d}:{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    start = time.monotonic()
    process = train(args, args.devices, out / "ddp", ["--trainer.max_steps", "-1", "--trainer.max_time", limit])
    samples: list[dict] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pids = [p for p in descendants(process.pid) if is_python(p)]
            rss = {p: r for p in pids if (r := rss_mib(p)) is not None}
            samples.append({"minute": (time.monotonic() - start) / 60, "step": last_step(out / "ddp"),
                            "rss": rss, "total": sum(rss.values())})
            s = samples[-1]
            print(f"{s['minute']:7.1f} min  step {s['step']:>6}  RSS " +
                  " ".join(f"{v:7.1f}" for v in rss.values()) + f"  total {s['total']:8.1f} MiB", flush=True)
            stop.wait(args.sample_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code = process.wait(timeout=args.minutes * 60 + 600)
        hung = False
    except subprocess.TimeoutExpired:
        process.kill()
        code, hung = process.wait(), True
    stop.set()
    sampler.join()
    wall = (time.monotonic() - start) / 60
    final_step = last_step(out / "ddp")

    warm = [s for s in samples if s["minute"] >= args.warmup_min and s["total"] > 0]
    slope = float(np.polyfit([s["minute"] for s in warm], [s["total"] for s in warm], 1)[0]) if len(warm) >= 3 else float("nan")
    steps = [s["step"] for s in samples]
    stalls = sum(1 for a, b in zip(steps[1:], steps[2:]) if b <= a and b >= 0)  # samples without a new logged step

    single = train(args, 1, out / "single", ["--trainer.max_steps", str(args.compare_steps)])
    single.wait()
    compare: dict[str, float] = {}
    for key in ("val/query_acc", "val/query_loss"):
        a, b = metric(out / "ddp", key), metric(out / "single", key)
        for step in sorted(set(a) & set(b)):
            compare[f"{key} @ step {step}"] = (a[step], b[step])
    try:
        p, q = parameters_at(out / "ddp", args.compare_steps), parameters_at(out / "single", args.compare_steps)
        rel = {k: float((p[k] - q[k]).norm() / q[k].norm().clamp(min=1e-12)) for k in q}
    except StopIteration:
        rel = {}
    for key in list(compare):
        ci = [metric(out / run, key.split(" @")[0] + "_ci95").get(int(key.rsplit(" ", 1)[1])) for run in ("ddp", "single")]
        compare[key] = (*compare[key], *ci)

    print(f"\nexit code {code}, hung: {hung}, wall {wall:.1f} min, final logged step {final_step}, "
          f"samples without a new logged step (after the first): {stalls}")
    print(f"total RSS after {args.warmup_min} min warm-up: {warm[0]['total'] if warm else float('nan'):.1f} -> "
          f"{warm[-1]['total'] if warm else float('nan'):.1f} MiB, slope {slope:+.3f} MiB/min "
          f"({60 * slope:+.1f} MiB/hour) over {len(warm)} samples")
    print(f"{args.devices} processes vs 1 process (the same tasks; only the all-reduce summation order differs):")
    if rel:
        print(f"  parameters at step {args.compare_steps}, relative difference ||p_W - p_1|| / ||p_1|| per tensor: "
              f"median {float(np.median(list(rel.values()))):.2e}, max {max(rel.values()):.2e} ({max(rel, key=rel.get)})")
    for key, (x, y, cx, cy) in compare.items():
        print(f"  {key}: {x:.4f} +- {cx or 0:.4f} vs {y:.4f} +- {cy or 0:.4f}")
    print("  (float32: summation-order differences grow over training, and Adam turns the float noise of gradients "
          "that are zero in exact arithmetic (a conv bias before a normalisation) into full steps; the float64 "
          "equality of W-process and 1-process training, MLP and Conv4, is tested in tests/test_meta_learners.py)")
    result = {"exit_code": code, "hung": hung, "wall_min": wall, "final_step": final_step, "stalls": stalls,
              "slope_mib_per_min": slope, "samples": [{**s, "rss": list(s["rss"].values())} for s in samples],
              "param_rel_diff": rel, "compare": compare}
    (out / "soak.json").write_text(json.dumps(result, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([s["minute"] for s in samples], [s["total"] for s in samples], marker="o", ms=3)
    ax.set_xlabel("minute")
    ax.set_ylabel("total RSS of the run (MiB)")
    ax.set_title(f"{args.devices}-process CPU DDP soak, slope {slope:+.2f} MiB/min", fontsize=9)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=100)
    print(f"plot: {args.plot}\nresults: {out / 'soak.json'}")


if __name__ == "__main__":
    main()
