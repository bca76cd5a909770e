"""MPC planning speed: ms per control step of our planners against torchrl's, vs candidates, horizon, threads.

What it measures: one planning call for ONE environment (``obs[1, 20]``) with the paper's dynamics model
(GrBAL / MB-MPC, Nagabandi et al. 2019: an MLP 3 x 512 ReLU on ``[obs, action]`` predicting the state
change, obs 20, action 6, random init, float32) and a HalfCheetah-style reward
``(x' - x) / 0.05 - 0.1 |a|^2``. All methods run in ONE process on the SAME model, the repeats taken
round-robin over the methods so that background load hits them alike; the tables give the median
(and the minimum) ms per planning call over ``--repeats`` calls after one warm-up call.

  model only      the floor: the dynamics called ``horizon`` times on n_candidates rows (plain loop)
  ours RS         lit_meta.rl.planners.random_shooting
  ours RS bf16    the same with matmul_dtype=torch.bfloat16 (torch.autocast around the model calls)
  ours CEM        cem, 5 iterations, n_elites = max(2, n_candidates // 10) (50 of 500), warm-started with
                  shift_plan of the previous call's plan
  ours CEM bf16   the same with bf16 matmuls
  ours MPPI       mppi, 5 iterations (to match torchrl's), temperature 1, warm-started
  torchrl CEM     torchrl.modules.CEMPlanner(env, horizon, 5, n_candidates, n_candidates // 10) on a
                  torchrl ModelBasedEnvBase wrapping the same model and reward (planners.torchrl_model_env)
  torchrl MPPI    torchrl.modules.MPPIPlanner(env, return-to-go, 1.0, horizon, 5, n_candidates, n // 10)

A second table checks that speed did not cost return: for 16 random start states (batched: E = 16),
the float32 model's return of each method's plan (open loop), its mean and the gap to ``ours RS``
(same generator, so RS fp32 and RS bf16 score the same candidates), for bf16 matmuls and for CEM with
fewer candidates.

Targets (issue 6, reported, never enforced; the 500 x 10 point at the largest thread count):
ours RS <= 35 ms/step with 2 threads, ours CEM <= 5.5x ours RS, ours CEM / MPPI faster than
torchrl's. A WARNING line is printed for each missed target.

    python benchmarks/planning.py                      # sweeps n_candidates at H=10 and H at N=500, 1 and 2 threads
    python benchmarks/planning.py --threads 2 --repeats 9
    python benchmarks/planning.py --full               # the whole grid {100, 500, 2000} x {5, 10, 20}
    python benchmarks/planning.py --points 500x10 --threads 2 --repeats 15 --quality-states 0   # the targets
    python benchmarks/planning.py --quick              # smoke test: hidden 32, tiny sizes, 1 repeat

Run it on a quiet machine (the load average is printed before and after). Writes a plot to
docs/planning.png (``--plot``; with ``--quick`` to the temporary folder unless ``--plot`` is given).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from lit_meta.rl.planners import cem, mppi, random_shooting, shift_plan, torchrl_model_env, torchrl_return_to_go

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line, save_figure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OBS_DIM, ACT_DIM, HIDDEN, DEPTH = 20, 6, 512, 3
ITERATIONS = 5
TARGET_RS_MS, TARGET_CEM_RATIO = 35.0, 5.5
METHODS = ("model only", "ours RS", "ours RS bf16", "ours CEM", "ours CEM bf16", "ours MPPI", "torchrl CEM",
           "torchrl MPPI")
TORCHRL = ("torchrl CEM", "torchrl MPPI")


def paper_model(hidden: int = HIDDEN, seed: int = 0) -> nn.Module:
    """MLP ``depth x hidden`` ReLU, ``[obs, action] -> state change`` (GrBAL's dynamics network)."""
    torch.manual_seed(seed)
    layers, width = [], OBS_DIM + ACT_DIM
    for _ in range(DEPTH):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, OBS_DIM))
    return nn.Sequential(*layers)


def make_dynamics(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    def dynamics(obs: Tensor, action: Tensor) -> Tensor:
        return obs + model(torch.cat([obs, action], -1))

    return dynamics


def reward_fn(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    """HalfCheetah-style: forward progress of ``obs[..., 0]`` per second minus the control cost."""
    return (next_obs[..., 0] - obs[..., 0]) / 0.05 - 0.1 * action.square().sum(-1)


def method_fns(dynamics, n: int, horizon: int, methods: list[str]) -> dict[str, Callable[[], object]]:
    """One zero-argument callable per method: one planning call for ``obs[1, OBS_DIM]``."""
    from tensordict import TensorDict
    from torchrl.modules import CEMPlanner, MPPIPlanner

    obs = torch.randn(1, OBS_DIM, generator=torch.Generator().manual_seed(1))
    low, high = -torch.ones(ACT_DIM), torch.ones(ACT_DIM)
    elites = max(2, n // 10)
    g = torch.Generator().manual_seed(0)
    warm: dict[str, Tensor | None] = {}
    common = dict(horizon=horizon, n_candidates=n, action_low=low, action_high=high, generator=g)

    def model_only():
        with torch.no_grad():
            x = obs.expand(n, OBS_DIM)
            for _ in range(horizon):
                x = dynamics(x, torch.rand(n, ACT_DIM, generator=g))
        return x

    def warm_started(name, planner, **kw):
        def call():
            res = planner(dynamics, reward_fn, obs, init_mean=warm.get(name), **common, **kw)
            warm[name] = shift_plan(res.plan, low, high)
            return res
        return call

    fns: dict[str, Callable[[], object]] = {
        "model only": model_only,
        "ours RS": lambda: random_shooting(dynamics, reward_fn, obs, **common),
        "ours RS bf16": lambda: random_shooting(dynamics, reward_fn, obs, matmul_dtype=torch.bfloat16, **common),
        "ours CEM": warm_started("cem", cem, iterations=ITERATIONS, n_elites=elites),
        "ours CEM bf16": warm_started("cem16", cem, iterations=ITERATIONS, n_elites=elites,
                                      matmul_dtype=torch.bfloat16),
        "ours MPPI": warm_started("mppi", mppi, iterations=ITERATIONS, temperature=1.0),
    }
    if any(m in TORCHRL for m in methods):
        env = torchrl_model_env(dynamics, reward_fn, OBS_DIM, low, high)
        td = TensorDict({"observation": obs}, [1])
        trl_cem = CEMPlanner(env, horizon, ITERATIONS, n, elites)
        trl_mppi = MPPIPlanner(env, torchrl_return_to_go(), 1.0, horizon, ITERATIONS, n, elites)
        fns["torchrl CEM"] = lambda: trl_cem(td.clone())
        fns["torchrl MPPI"] = lambda: trl_mppi(td.clone())
    return {m: fns[m] for m in methods}


def time_setting(dynamics, n: int, horizon: int, methods: list[str], repeats: int) -> dict[str, tuple[float, float]]:
    """``{method: (median ms, min ms)}``, methods interleaved round-robin."""
    fns = method_fns(dynamics, n, horizon, methods)
    for f in fns.values():
        f()  # warm-up
    times: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(repeats):
        for m, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[m].append((time.perf_counter() - t0) * 1e3)
    return {m: (statistics.median(v), min(v)) for m, v in times.items()}


def print_table(title: str, key: str, points: list[tuple[int, int]], results: dict, methods: list[str]) -> None:
    print(f"\n{title}: ms per planning call, median (min)")
    head = f"{key:>12s} | " + " | ".join(f"{m:>15s}" for m in methods)
    print(head)
    print("-" * len(head))
    for n, h in points:
        res = results[(n, h)]
        label = {"n_candidates": f"N={n}", "horizon": f"H={h}"}.get(key, f"{n}x{h}")
        print(f"{label:>12s} | " + " | ".join(f"{res[m][0]:7.1f} ({res[m][1]:5.1f})" for m in methods))


def check_targets(results: dict, threads: int, methods: list[str], quick: bool) -> list[str]:
    res = results.get((500, 10))
    if res is None or quick:
        return []
    notes, warnings = [], []
    if "ours RS" in res:
        rs = res["ours RS"][0]
        line = f"ours RS 500 x 10: {rs:.1f} ms median at {threads} threads (target <= {TARGET_RS_MS} at 2 threads)"
        (warnings if threads == 2 and rs > TARGET_RS_MS else notes).append(line)
        if "ours CEM" in res:
            ratio = res["ours CEM"][0] / rs
            line = f"ours CEM / ours RS = {ratio:.2f}x (target <= {TARGET_CEM_RATIO}x)"
            (warnings if ratio > TARGET_CEM_RATIO else notes).append(line)
    for ours, theirs in (("ours CEM", "torchrl CEM"), ("ours MPPI", "torchrl MPPI")):
        if ours in res and theirs in res:
            speedup = res[theirs][0] / res[ours][0]
            line = f"{ours} is {speedup:.2f}x faster than {theirs} (median; min: {res[theirs][1] / res[ours][1]:.2f}x)"
            (warnings if speedup <= 1 else notes).append(line)
    for line in notes:
        print(f"target: {line}")
    for line in warnings:
        print(f"WARNING: missed target: {line}")
    return warnings


@torch.no_grad()
def plan_return(dynamics, obs: Tensor, plan: Tensor) -> Tensor:
    """The float32 model's return of ``plan[E, H, A]`` from ``obs[E, D]``."""
    x, total = obs, torch.zeros(len(obs))
    for t in range(plan.shape[1]):
        nxt = dynamics(x, plan[:, t])
        total += reward_fn(x, plan[:, t], nxt)
        x = nxt
    return total


def quality_table(dynamics, n: int, horizon: int, n_states: int) -> None:
    """Mean fp32 model return of each method's plan over ``n_states`` random starts, and the gap to ours RS."""
    obs = torch.randn(n_states, OBS_DIM, generator=torch.Generator().manual_seed(2))
    low, high = -torch.ones(ACT_DIM), torch.ones(ACT_DIM)
    small = max(1, n // 5)
    configs = {
        f"ours RS {n}": (random_shooting, dict(n_candidates=n)),
        f"ours RS {n} bf16": (random_shooting, dict(n_candidates=n, matmul_dtype=torch.bfloat16)),
        f"ours RS {ITERATIONS * n} (= CEM's model rows)": (random_shooting, dict(n_candidates=ITERATIONS * n)),
        f"ours CEM {ITERATIONS} x {n}": (cem, dict(n_candidates=n, n_elites=max(2, n // 10), iterations=ITERATIONS)),
        f"ours CEM {ITERATIONS} x {n} bf16": (cem, dict(n_candidates=n, n_elites=max(2, n // 10),
                                                       iterations=ITERATIONS, matmul_dtype=torch.bfloat16)),
        f"ours CEM {ITERATIONS} x {small}": (cem, dict(n_candidates=small, n_elites=max(1, small // 10),
                                                      iterations=ITERATIONS)),
        f"ours CEM 3 x {small}": (cem, dict(n_candidates=small, n_elites=max(1, small // 10), iterations=3)),
        f"ours MPPI {ITERATIONS} x {n}": (mppi, dict(n_candidates=n, iterations=ITERATIONS, temperature=1.0)),
    }
    print(f"\nreturn check: float32 model return of the plan (open loop, H={horizon}), {n_states} random starts; "
          "gap = method - ours RS per start (mean +- standard error)")
    print(f"{'method':>36s} | {'model rows':>10s} | {'mean return':>11s} | {'gap to RS':>17s} | {'ms/env':>7s}")
    base = None
    for name, (planner, kw) in configs.items():
        planner(dynamics, reward_fn, obs[:1], horizon=horizon, action_low=low, action_high=high, **kw)  # warm-up
        t0 = time.perf_counter()
        res = planner(dynamics, reward_fn, obs, horizon=horizon, action_low=low, action_high=high,
                      generator=torch.Generator().manual_seed(0), **kw)
        ms = (time.perf_counter() - t0) * 1e3 / n_states
        ret = plan_return(dynamics, obs, res.plan)
        base = ret if base is None else base
        gap = ret - base
        se = gap.std() / math.sqrt(len(gap)) if len(gap) > 1 else torch.tensor(0.0)
        rows = kw["n_candidates"] * kw.get("iterations", 1) * horizon
        print(f"{name:>36s} | {rows:>10d} | {ret.mean():11.3f} | {gap.mean():+8.3f} +- {se:6.3f} | {ms:7.1f}")


def plot(path: str, all_results: dict, methods: list[str], n_points, h_points) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = ["-", "--", ":", "-."]
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for k, (threads, results) in enumerate(sorted(all_results.items(), reverse=True)):
        for ax, points, key, xlabel in ((axes[0], n_points, 0, "n_candidates (horizon 10)"),
                                        (axes[1], h_points, 1, "horizon (500 candidates)")):
            pts = [p for p in points if p in results]
            for m in methods:
                ax.plot([p[key] for p in pts], [results[p][m][0] for p in pts], styles[k % 4], marker="o",
                        color=colors[m], label=f"{m} ({threads} thr)", markersize=3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("ms per planning call (median)")
            ax.set_xscale("log" if key == 0 else "linear")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"MPC planning, MLP {DEPTH}x{HIDDEN} ReLU, obs {OBS_DIM}, action {ACT_DIM}, CEM/MPPI "
                 f"{ITERATIONS} iterations\n{machine_line().split(' | torch threads')[0]}", fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch thread counts, the tables per count (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method and point (median reported)")
    parser.add_argument("--quick", action="store_true", help="smoke test: hidden 32, tiny sizes, 1 repeat")
    parser.add_argument("--full", action="store_true", help="the whole grid n_candidates x horizon, 7 repeats")
    parser.add_argument("--points", nargs="+", default=None, metavar="NxH",
                        help="only these n_candidates x horizon points, e.g. --points 500x10 (one table)")
    parser.add_argument("--no-torchrl", action="store_true", help="skip torchrl's planners")
    parser.add_argument("--quality-states", type=int, default=16, help="start states of the return check (0: skip)")
    parser.add_argument("--plot", default=None, help="plot path (default docs/planning.png; with --quick a file in "
                        "the temporary folder)")
    args = parser.parse_args()
    if args.repeats < 1 or min(args.threads) < 1 or args.quality_states < 0:
        parser.error("--repeats and --threads must be >= 1, --quality-states >= 0")
    methods = [m for m in METHODS if not (args.no_torchrl and m in TORCHRL)]
    hidden, repeats = HIDDEN, args.repeats
    n_values, h_values, base_n, base_h = (100, 500, 2000), (5, 10, 20), 500, 10
    if args.quick:
        hidden, repeats, n_values, h_values, base_n, base_h = 32, 1, (16, 32), (2, 3), 32, 3
    elif args.full:
        repeats = max(repeats, 7)
    if args.full and not args.quick:
        points = [(n, h) for h in h_values for n in n_values]
    else:
        points = list(dict.fromkeys([(n, base_h) for n in n_values] + [(base_n, h) for h in h_values]))
    if args.points:
        try:
            points = [tuple(int(v) for v in p.lower().split("x")) for p in args.points]
            assert all(len(p) == 2 and min(p) >= 1 for p in points)
        except (ValueError, AssertionError):
            parser.error(f"--points wants NxH pairs such as 500x10, got {args.points}")
    n_points = [(n, base_h) for n in n_values]
    h_points = [(base_n, h) for h in h_values]
    plot_path = args.plot or (str(Path(tempfile.gettempdir()) / "planning_quick.png") if args.quick
                              else str(REPO / "docs" / "planning.png"))

    torch.set_num_threads(args.threads[0])
    print(machine_line())
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    print(f"cpu bf16: avx512_bf16={'avx512_bf16' in flags} amx_bf16={'amx_bf16' in flags}; "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"model: MLP {DEPTH} x {hidden} ReLU, obs {OBS_DIM}, action {ACT_DIM}; CEM/MPPI {ITERATIONS} iterations, "
          f"elites n // 10; {repeats} repeats after 1 warm-up, methods round-robin")
    if args.quick:
        print("--quick: tiny sizes for a smoke test; its ms and the target checks mean nothing")
    dynamics = make_dynamics(paper_model(hidden))  # parameters keep requires_grad, as a learner's: planning is no_grad
    all_results: dict[int, dict] = {}
    warnings: list[str] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        results = {p: time_setting(dynamics, p[0], p[1], methods, repeats) for p in points}
        all_results[threads] = results
        print(f"\n===== {threads} torch thread(s) =====")
        if args.points:
            print_table("chosen points", "N x H", points, results, methods)
        elif args.full and not args.quick:
            for h in h_values:
                print_table(f"horizon {h}", "n_candidates", [(n, h) for n in n_values], results, methods)
        else:
            print_table(f"horizon {base_h}", "n_candidates", n_points, results, methods)
            print_table(f"{base_n} candidates", "horizon", h_points, results, methods)
        warnings += check_targets(results, threads, methods, args.quick)
    if args.quality_states:
        torch.set_num_threads(max(args.threads))
        quality_table(dynamics, base_n, base_h, 2 if args.quick else args.quality_states)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not warnings and not args.quick and 2 in args.threads:
        print("all targets met")
    if args.points and not args.plot:
        print("--points: no plot (give --plot to write one)")
    else:
        plot(plot_path, all_results, methods, n_points, h_points)


if __name__ == "__main__":
    main()
