"""Scaling of iMAML meta-training: tasks/s with 1 and 2 processes (DDP), tasks/s vs meta-batch, and where the
time of one meta-step goes.

What it measures: iMAML on Omniglot 5-way 1-shot as configs/imaml_omniglot_5w1s_quick.yaml (Conv4 with 32
channels, 8 GD inner steps, lam 2, 5 CG steps, 5 queries per class, meta-batch 8), three ways:

1. Processes. ``train.py fit`` on the config, run as a child process from the repository root, with
   ``--trainer.accelerator cpu --trainer.devices N`` (N in ``--processes``, DDP for N > 1), validation,
   checkpoints and the config's callbacks off (``--trainer.callbacks`` is replaced by :class:`StepClock`, which
   the child imports from this file through PYTHONPATH). The data's ``meta_batch_size`` is GLOBAL: every DDP
   rank gets ``meta_batch_size / N`` tasks, so a step is the same meta-update whatever N. tasks/s =
   meta-batch x (steps after ``--warmup``) / (time from the end of the warm-up step to the end of the last
   step), read on rank 0 (each step ends with the all-reduce of the meta-gradient, so the ranks stay in step).
   Reported beside it: the speed-up over 1 process, rank 0's torch threads (Lightning's CPU DDP launcher sets
   them to cores / processes unless OMP_NUM_THREADS is set; 1 process keeps torch's default) and the child's
   wall time (start-up included). On a machine with CUDA the same runs with ``--trainer.accelerator gpu``
   (1 process per GPU, up to the GPUs present) follow. With ``--repeats R`` every setting runs R times, the
   settings taking turns, and the run with the median tasks/s is reported.
2. Meta-batch. The same single-process CPU run for each size of ``--meta-batches`` (the 1-process run of 1.
   is reused where its meta-batch is one of them).
3. Profile of one meta-step, in this process without a Trainer: the steps of ``IMAML.training_step`` timed
   one by one with ``time.perf_counter`` (median over ``--profile-repeats`` meta-steps after one warm-up):
   sampling the episode (what the DataLoader does; ``to_float`` included), the inner solve
   (``functional.inner_solve``, Eq. 4), the query gradients (``functional.task_grads_and_outputs``), the CG
   solve (``functional.implicit_meta_grad``, Eq. 6-7: the Hessian's graph and the CG products) and the rest
   (finite mask, sum over tasks, query scores, the outer Adam step). Set against the Trainer's step time
   of 1. (1 CPU process, same meta-batch), the difference is what Lightning's loop and logging add. Then
   ``torch.profiler`` (CPU) over one meta-step: the top 10 operators by self CPU time.

    python benchmarks/scaling.py            # 40 steps per run, meta-batch 4..32, ~6 minutes on 2 quiet cores
    python benchmarks/scaling.py --full     # 200 steps, meta-batch 4..64, 1/2/4 processes (cores allowing), 3 runs each
    python benchmarks/scaling.py --quick    # smoke test: 8 steps per run, meta-batch 4 and 8, plot in /tmp
    python benchmarks/scaling.py --no-gpu   # CPU only, even where CUDA is available

Run it on a quiet machine: with N processes on N cores, anything else running takes a core from a rank and
every step waits for the slowest rank. Writes docs/scaling.png (``--plot``; with ``--quick``
/tmp/scaling_quick.png). Data: ``$LIT_META_DATA`` (default ``../shared/data`` beside the repository).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, save_figure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "imaml_omniglot_5w1s_quick.yaml"


class StepClock(Callback):
    """In the child ``train.py``: rank 0 records the end time of every training step and, at the end of
    training, writes them (and its torch thread count and the world size) as JSON to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.times: list[float] = []
        self.threads = 0

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        self.threads = torch.get_num_threads()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps({"times": self.times, "threads": self.threads,
                                                   "world_size": trainer.world_size}))


@dataclass
class Run:
    """One ``train.py fit`` child: its setting and what :class:`StepClock` measured."""

    accelerator: str
    processes: int
    meta_batch: int
    tasks_per_s: float
    step_ms: float
    threads: int
    wall_s: float


Setting = tuple[str, int, int]  # accelerator, processes, meta-batch


def fit_child(args: argparse.Namespace, setting: Setting, repeat: int, out: Path) -> Run:
    """``train.py fit`` on ``--config`` with ``processes`` devices; tasks/s after the warm-up steps."""
    accelerator, processes, meta_batch = setting
    name = f"{accelerator}_{processes}p_mb{meta_batch}_r{repeat}"
    clock = out / f"{name}.json"
    callbacks = [{"class_path": f"{Path(__file__).stem}.StepClock", "init_args": {"path": str(clock)}}]
    command = [sys.executable, "train.py", "fit", "--config", str(args.config),
               "--trainer.accelerator", accelerator, "--trainer.devices", str(processes),
               *(["--trainer.strategy", "ddp"] if processes > 1 else []),
               "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
               "--trainer.enable_model_summary", "false", "--trainer.callbacks", json.dumps(callbacks),
               "--trainer.logger.init_args.save_dir", str(out / name),
               "--data.init_args.meta_batch_size", str(meta_batch)]
    here = str(Path(__file__).resolve().parent)
    env = {"LIT_META_DATA": str(REPO.parent / "shared" / "data"), **os.environ, "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    log_path = out / f"{name}.log"
    start = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)  # its own process group: a timeout ends the DDP ranks too
        try:
            code = child.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            code = None
    wall = time.perf_counter() - start
    if code != 0 or not clock.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        why = f"timed out after {args.timeout} s" if code is None else f"exit code {code}"
        keep = "" if args.out else " (kept only with --out)"
        raise SystemExit(f"{name}: train.py failed ({why}); last lines of {log_path}{keep}:\n{tail}")
    result = json.loads(clock.read_text())
    times = result["times"]
    if len(times) <= args.warmup:
        raise SystemExit(f"{name}: {len(times)} steps recorded, not more than --warmup {args.warmup}")
    steps = len(times) - args.warmup
    seconds = times[-1] - times[args.warmup - 1]
    return Run(accelerator, processes, meta_batch, meta_batch * steps / seconds, 1000 * seconds / steps,
               result["threads"], wall)


def measure(args: argparse.Namespace, settings: list[Setting], out: Path) -> dict[Setting, Run]:
    """Every setting ``--repeats`` times, taking turns (background load hits them alike); the median run of each."""
    runs: dict[Setting, list[Run]] = {s: [] for s in settings}
    for repeat in range(args.repeats):
        for setting in settings:
            runs[setting].append(fit_child(args, setting, repeat, out))
    return {s: sorted(rs, key=lambda r: r.tasks_per_s)[len(rs) // 2] for s, rs in runs.items()}


# --------------------------------------------------------------------------- 3. one meta-step, phase by phase

@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null: the profiler's C++ side (kineto) prints start/stop lines there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_meta_step(meta_batch: int, repeats: int) -> tuple[dict[str, float], str]:
    """Median ms per phase of one iMAML meta-step (no Trainer) and the torch.profiler table of one more."""
    import torch

    import lit_meta
    from lit_meta.datamodules import OmniglotDataModule
    from lit_meta.episode import Episode, to_float
    from lit_meta.backends import task_backend
    from lit_meta.functional import implicit_meta_grad, inner_solve, loss_for, params_of

    data_root = Path(os.environ.get("LIT_META_DATA", REPO.parent / "shared" / "data"))
    data = OmniglotDataModule(data_dir=str(data_root / "omniglot"), n_way=5, k_shot=1, k_query=5,
                              meta_batch_size=meta_batch, steps_per_epoch=10_000, eval_episodes=20,
                              eval_meta_batch_size=10)
    data.prepare_data()
    data.setup("fit")
    dataset = data.dataset("train")
    torch.manual_seed(0)
    model = lit_meta.IMAML(lit_meta.Conv4(out_features=5, hidden=32), lam=2.0, inner_steps=8, inner_lr=0.1,
                           cg_steps=5)
    optimizer = model.configure_optimizers()
    net = model.net

    def meta_step(step: int, clock: Callable[[str], None]) -> None:
        """What ``IMAML.training_step`` computes for one meta-batch, ``clock(phase)`` after each phase."""
        episode = to_float(Episode(*dataset[(0, step)]))
        clock("episode: sample + to_float")
        loss_fn = loss_for(episode.query_y)
        phi, curve = inner_solve(task_backend(net), loss_fn, params_of(net), episode.support_x, episode.support_y, lam=model.lam,
                                 inner_steps=model.inner_steps, inner_lr=model.inner_lr, solver=model.inner_solver,
                                 cg_steps=model.cg_steps)
        clock("inner solve (Eq. 4)")
        query_grad, _, outputs = task_backend(net).grads_and_outputs(loss_fn, phi, episode.query_x, episode.query_y)
        clock("query gradients")
        solved = implicit_meta_grad(task_backend(net), loss_fn, phi, (episode.support_x, episode.support_y), query_grad,
                                    lam=model.lam, cg_steps=model.cg_steps, cg_tol=model.cg_tol)
        clock("CG solve (Eq. 6-7)")
        grads = solved.x
        finite = torch.stack([g.flatten(1).isfinite().all(1) for g in grads.values()]).all(0)
        finite = finite & curve.isfinite().all(0)
        count = finite.sum().clamp(min=1)
        model.per_task_scores(outputs, episode)
        optimizer.zero_grad()
        for name, p in net.named_parameters():
            g = grads[name]
            p.grad = torch.where(finite.view(-1, *[1] * (g.dim() - 1)), g, 0.0).sum(0) / count
        optimizer.step()
        clock("rest: finite mask, sum, scores, Adam")

    phases: dict[str, list[float]] = {}
    for repeat in range(repeats + 1):  # repeat 0: warm-up, not recorded
        last = time.perf_counter()

        def clock(phase: str) -> None:
            nonlocal last
            now = time.perf_counter()
            if repeat > 0:
                phases.setdefault(phase, []).append(1000 * (now - last))
            last = now

        meta_step(repeat, clock)
    with native_stderr_silenced():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            meta_step(repeats + 1, lambda phase: None)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
    return {phase: statistics.median(ms) for phase, ms in phases.items()}, table


# --------------------------------------------------------------------------- report

def print_runs(title: str, runs: list[Run], base: Callable[[Run], Run | None]) -> None:
    print(f"\n{title}")
    header = (f"{'accel':>5} | {'processes':>9} | {'meta-batch':>10} | {'tasks/ proc':>11} | {'tasks/s':>8} | "
              f"{'ms/step':>8} | {'speed-up':>8} | {'threads/proc':>12} | {'wall s':>7}")
    print(header)
    print("-" * len(header))
    for r in runs:
        b = base(r)
        speedup = f"{r.tasks_per_s / b.tasks_per_s:.2f}x" if b is not None else "-"
        print(f"{r.accelerator:>5} | {r.processes:>9} | {r.meta_batch:>10} | {r.meta_batch // r.processes:>11} | "
              f"{r.tasks_per_s:>8.2f} | {r.step_ms:>8.1f} | {speedup:>8} | {r.threads:>12} | {r.wall_s:>7.1f}")


def plot(path: Path, process_runs: list[Run], batch_runs: list[Run], title: str) -> None:
    """Two panels: tasks/s vs processes (one line per accelerator), tasks/s vs meta-batch (1 CPU process)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for accelerator in dict.fromkeys(r.accelerator for r in process_runs):
        runs = [r for r in process_runs if r.accelerator == accelerator]
        a.plot([r.processes for r in runs], [r.tasks_per_s for r in runs], marker="o", label=accelerator)
    a.set_xticks(sorted({r.processes for r in process_runs}))
    a.set_xlabel("processes (DDP)")
    a.set_ylabel("tasks/s")
    a.set_title(f"meta-batch {process_runs[0].meta_batch} (global)", fontsize=9)
    a.set_ylim(bottom=0)
    a.legend(fontsize=8)
    b.plot([r.meta_batch for r in batch_runs], [r.tasks_per_s for r in batch_runs], marker="o", label="cpu, 1 process")
    b.set_xscale("log", base=2)
    b.set_xticks([r.meta_batch for r in batch_runs], [str(r.meta_batch) for r in batch_runs])
    b.set_xlabel("meta-batch (tasks per step)")
    b.set_ylabel("tasks/s")
    b.set_title("1 CPU process", fontsize=9)
    b.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--steps", type=int, default=None, help="meta-steps per run (default 40; quick 8, full 200)")
    parser.add_argument("--warmup", type=int, default=None, help="steps not timed (default 4; quick 2, full 10)")
    parser.add_argument("--meta-batch", type=int, default=8, help="global meta-batch of the process runs")
    parser.add_argument("--processes", type=int, nargs="+", default=None,
                        help="CPU process counts (default 1 2; full also 4 where there are >= 4 cores)")
    parser.add_argument("--meta-batches", type=int, nargs="+", default=None,
                        help="meta-batch sizes of the 1-process sweep (default 4 8 16 32; quick 4 8; full 4..64)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per setting, taking turns; the median is reported (default 1; full 3)")
    parser.add_argument("--profile-repeats", type=int, default=None, help="timed meta-steps (default 5; quick 2)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU runs even where CUDA is available")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a train.py child is killed")
    parser.add_argument("--out", type=Path, default=None, help="keep the children's logs here (default: temporary)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="default docs/scaling.png; with --quick /tmp/scaling_quick.png")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke test: 8 steps per run, meta-batch 4 and 8")
    size.add_argument("--full", action="store_true", help="200 steps per run, meta-batch 4..64, up to 4 processes")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    steps, warmup, batches, processes, n_runs, repeats = 40, 4, [4, 8, 16, 32], [1, 2], 1, 5
    if args.quick:
        steps, warmup, batches, repeats = 8, 2, [4, 8], 2  # 8: the 1-process run, reused
    elif args.full:
        steps, warmup, batches, n_runs, repeats = 200, 10, [4, 8, 16, 32, 64], 3, 10
        processes = [1, 2, 4] if cores >= 4 else [1, 2]
    args.steps = args.steps or steps
    args.warmup = args.warmup if args.warmup is not None else warmup
    args.meta_batches = args.meta_batches or batches
    args.processes = args.processes or processes
    args.repeats = args.repeats or n_runs
    args.profile_repeats = args.profile_repeats or repeats
    plot_path = args.plot or (Path("/tmp/scaling_quick.png") if args.quick else REPO / "docs" / "scaling.png")
    if args.warmup < 1 or args.steps <= args.warmup:
        parser.error("need 1 <= --warmup < --steps")
    if args.repeats < 1 or args.profile_repeats < 1 or min(args.processes + args.meta_batches) < 1:
        parser.error("--repeats, --profile-repeats, --processes and --meta-batches must be >= 1")
    if any(args.meta_batch % n for n in args.processes):
        parser.error(f"--meta-batch {args.meta_batch} must divide over every process count {args.processes}")

    import torch

    from lit_meta.allocator import keep_freed_memory

    gpus = 0 if args.no_gpu or not torch.cuda.is_available() else torch.cuda.device_count()
    line = machine_line(malloc_kept=keep_freed_memory())
    print(line)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"WARNING: 1-minute load average {load:.1f} on {cores} cores before the runs: other processes compete "
              f"for the cores, tasks/s will be low and noisy (with N threads per process and a core taken, every "
              f"parallel op waits for the descheduled thread)")
    if args.quick:
        print("--quick: a smoke test; its tasks/s mean nothing")
    print(f"train.py fit --config {args.config.name}: {args.steps} steps per run, tasks/s after {args.warmup} "
          f"warm-up steps, median of {args.repeats} run(s); no validation, checkpoints or lit_meta callbacks; "
          f"{'GPUs: ' + str(gpus) if gpus else 'no GPU runs'}")

    with tempfile.TemporaryDirectory(prefix="lit_meta_scaling_") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        process_settings = [("cpu", n, args.meta_batch) for n in args.processes]
        process_settings += [("gpu", n, args.meta_batch) for n in args.processes if n <= gpus]
        batch_settings = [("cpu", 1, b) for b in args.meta_batches]
        runs = measure(args, list(dict.fromkeys(process_settings + batch_settings)), out)
    process_runs, batch_runs = [runs[s] for s in process_settings], [runs[s] for s in batch_settings]
    if any(n > cores for n in args.processes):
        print(f"note: more processes than the {cores} cores: the ranks share cores")
    first: dict[str, Run] = {}
    for r in process_runs:
        first.setdefault(r.accelerator, r)
    print_runs("1. tasks/s vs processes (DDP; the meta-batch is split over the processes; speed-up vs the first "
               "count)", process_runs, lambda r: first[r.accelerator])
    print_runs("2. tasks/s vs meta-batch (1 CPU process; speed-up vs the smallest meta-batch)", batch_runs,
               lambda r: batch_runs[0])

    phases, table = profile_meta_step(args.meta_batch, args.profile_repeats)
    total = sum(phases.values())
    print(f"\n3. one iMAML meta-step without a Trainer (Conv4 32 ch, lam 2, 8 GD inner steps, 5 CG steps), Omniglot "
          f"5w1s, meta-batch {args.meta_batch}, torch threads {torch.get_num_threads()} (median of "
          f"{args.profile_repeats} after 1 warm-up)")
    print(f"{'phase':<38} | {'ms':>8} | {'%':>6}")
    print("-" * 58)
    for phase, ms in phases.items():
        print(f"{phase:<38} | {ms:>8.1f} | {100 * ms / total:>5.1f}%")
    print(f"{'sum':<38} | {total:>8.1f} | {100.0:>5.1f}%")
    trainer_step = runs.get(("cpu", 1, args.meta_batch))
    if trainer_step is not None:
        print(f"Trainer step (1., 1 CPU process, {trainer_step.threads} threads): {trainer_step.step_ms:.1f} ms; "
              f"beyond the phases above (Lightning's loop, logging, metrics): {trainer_step.step_ms - total:+.1f} ms "
              f"({100 * (trainer_step.step_ms - total) / trainer_step.step_ms:+.1f}%; separate runs: noisy)")
    print(f"\ntorch.profiler, one more meta-step (CPU), top 10 operators by self CPU time:\n{table}")
    print(f"1-minute load average after the runs: {os.getloadavg()[0]:.1f} on {cores} cores")
    plot(plot_path, process_runs, batch_runs, line)


if __name__ == "__main__":
    main()
