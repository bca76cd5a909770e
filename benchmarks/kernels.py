"""Which of Conv4's custom kernels (lit_meta.kernels) pay: one meta-gradient with each kernel replaced by the plain
torch op it equals, side by side.

What it measures: ms of one meta-gradient of the whole meta-batch on Conv4's task-folded path (``forward_tasks``),
Omniglot-shaped random episodes (1 x 28 x 28 images, 5-way 1-shot, 5 queries per class, meta-batch 32), Conv-4 with
64 channels, ``pool="stride"`` and ``pool="max"`` (BatchNorm), one torch thread by default:

  iMAML   lit_meta.functional: inner_solve (GD, 16 steps, lam 2, inner lr 0.1) -> per-task gradients on the query
          set -> implicit_meta_grad (5 CG steps, each a double backward through the support gradient's graph)
  MAML    second-order maml_meta_grads, 5 inner steps, inner lr 0.1 (a backward through the unrolled steps)

in these variants (the names in lit_meta.nets that ``forward_tasks`` calls, monkeypatched for the benchmark; in the
max-pool block the grouped convolution is the one lit_meta.kernels' fused block calls, patched there too):

  all kernels                  the library as it is
  plain grouped_conv           F.conv2d(groups=T): torch's double backward (one convolution per group, weight term)
  plain batch_norm             F.batch_norm(training=True): aten's kernels and double backward
  unfused                      the max-pool block as the composition relu(max_pool(batch_norm(grouped_conv(x))))
                               instead of the fused conv_bn_relu_max_pool (with the kernels above)
  unfused, plain batch_norm    ... and F.batch_norm (the max-pool net calls batch_norm only when unfused)
  unfused, plain max_pool      ... and F.max_pool2d(2, ceil_mode=True), plain autograd
  all plain                    every kernel replaced: torch ops only

A variant that changes nothing on a net (plain batch_norm on the fused max-pool net, any "unfused" on the stride-2
net) is not timed there. The repeats run round-robin over the cells (net x method x variant; their order rotated each
round), so that background load hits them alike. Each call is timed twice: the process's CPU time (user + system:
with one torch thread, the time of the one thread that computes, which other jobs on shared cores inflate far less
than the wall time) and the wall time; medians are reported, with each cell's spread ((max - min) / median over the
rounds). A kernel's speedup is (time without it) / (time with it), taken per round on CPU time (the two calls of a
round are close in time) and reported as the median and [min, max] of those ratios, on the variant where the kernel
runs (batch_norm and max_pool on the max-pool net inside "unfused"); beside it the ratio of the wall-time medians. It
pays where the median is >= 1.05 and the minimum > 1 (beyond the repeat-to-repeat spread) on some (net, method).

Before timing, every variant's per-task meta-gradients are compared with the all-kernels ones in float64 on the first
2 tasks (relative error, must be < 1e-9, else the run stops: the variants compute the same function); after timing
each variant's float32 meta-gradients are compared with the all-kernels float64 ones on the whole meta-batch (median
relative error over the tasks: a variant that rounded worse would show here; a few tasks of these random episodes
are ill-conditioned in float32 whatever the kernels, hence the median).

    python benchmarks/kernels.py                       # ~35 minutes on 2 shared cores, 1 torch thread, 7 rounds
    python benchmarks/kernels.py --pools stride --repeats 15 --methods imaml
    python benchmarks/kernels.py --quick               # smoke test: 2 tasks, hidden 8, 2 steps, 1 repeat

Writes a bar chart to docs/kernels.png (``--plot``; with ``--quick`` to the temporary folder unless ``--plot`` is
given). Results and the decision they led to: docs/kernels.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lit_meta.kernels as kernels
import lit_meta.nets as nets
from lit_meta.allocator import keep_freed_memory
from lit_meta.backends import FoldedBackend
from lit_meta.functional import implicit_meta_grad, inner_solve, loss_for, maml_meta_grads, params_of
from lit_meta.nets import Conv4

sys.path.insert(0, str(Path(__file__).resolve().parent))
import meta_throughput  # noqa: E402
from common import machine_line, save_figure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POOLS = ("stride", "max")
GUARD_TOL = 1e-9
PAYS = 1.05  # a kernel stays where its median speedup reaches this on some (net, method), the whole range above 1


@dataclass(frozen=True)
class Setting(meta_throughput.Setting):
    """meta_throughput's setting (5-way 1-shot here) and the MAML inner steps this benchmark times."""

    n_way: int = 5
    maml_steps: int = 5


# --------------------------------------------------------------------------- the plain torch ops

def plain_grouped_conv(x: Tensor, w: Tensor, b: Tensor, conv: nn.Conv2d, groups: int) -> Tensor:
    return F.conv2d(x, w, b, stride=conv.stride, padding=conv.padding, groups=groups)


def plain_batch_norm(h: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> Tensor:
    return F.batch_norm(h, None, None, gamma, beta, training=True, eps=eps)


def plain_max_pool(h: Tensor) -> Tensor:
    return F.max_pool2d(h, 2, ceil_mode=True)


def unfused_block(h: Tensor, w: Tensor, b: Tensor, gamma: Tensor, beta: Tensor, conv: nn.Conv2d, eps: float,
                  groups: int) -> Tensor:
    """The max-pool block as its composition, with whatever lit_meta.nets calls for each piece right now."""
    h = _current("grouped_conv")(h, w, b, conv, groups)
    h = _current("batch_norm")(h, gamma, beta, eps)
    return F.relu(_current("max_pool")(h))


PLAIN: dict[str, Callable] = {"grouped_conv": plain_grouped_conv, "batch_norm": plain_batch_norm,
                              "max_pool": plain_max_pool, "conv_bn_relu_max_pool": unfused_block}
SHORT = {"grouped_conv": "plain grouped_conv", "batch_norm": "plain batch_norm", "max_pool": "plain max_pool",
         "conv_bn_relu_max_pool": "unfused"}
VARIANTS: tuple[frozenset[str], ...] = tuple(frozenset(v) for v in (
    (), ("grouped_conv",), ("batch_norm",), ("conv_bn_relu_max_pool",), ("conv_bn_relu_max_pool", "batch_norm"),
    ("conv_bn_relu_max_pool", "max_pool"), tuple(PLAIN)))


def _current(name: str) -> Callable:
    """What lit_meta.nets calls for ``name`` now (a kernel, its patched replacement, or the plain op where the kernel
    is gone from the library)."""
    return getattr(nets, name, PLAIN[name])


def variant_name(patched: frozenset[str]) -> str:
    if not patched:
        return "all kernels"
    if patched == set(PLAIN):
        return "all plain"
    order = [k for k in ("conv_bn_relu_max_pool", "grouped_conv", "batch_norm", "max_pool") if k in patched]
    return ", ".join(SHORT[k] for k in order)


def kernels_present() -> set[str]:
    """The kernels lit_meta.nets still calls (one that did not pay is gone: its plain op is called instead)."""
    return {name for name in PLAIN if hasattr(nets, name)}


def effective(pool: str, patched: frozenset[str]) -> frozenset[str]:
    """The replacements that change what ``forward_tasks`` runs on a Conv4(pool, norm="batch")."""
    used = {"grouped_conv", "batch_norm"} if pool == "stride" else {"grouped_conv", "conv_bn_relu_max_pool"}
    if pool == "max" and "conv_bn_relu_max_pool" in patched:
        used |= {"batch_norm", "max_pool"}
    return frozenset(patched & used & kernels_present())


@contextlib.contextmanager
def patched(names: frozenset[str]) -> Iterator[None]:
    """lit_meta.nets (and lit_meta.kernels, whose fused block calls grouped_conv) calling the plain ops for
    ``names``."""
    saved = []
    for name in names:
        for module in (nets, kernels):
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, PLAIN[name])
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


# --------------------------------------------------------------------------- the meta-gradients

def imaml(net: nn.Module, ep: tuple[Tensor, ...], s: Setting) -> dict[str, Tensor]:
    """iMAML-GD's per-task meta-gradients ``[T, ...]``, as IMAML.task_meta_grads."""
    sx, sy, qx, qy = ep
    backend, loss_fn = FoldedBackend(net), loss_for(qy)
    phi, _ = inner_solve(backend, loss_fn, params_of(net), sx, sy, lam=s.lam, inner_steps=s.inner_steps,
                         inner_lr=s.inner_lr, solver="gd")
    query_grad, _, _ = backend.grads_and_outputs(loss_fn, phi, qx, qy)
    solved = implicit_meta_grad(backend, loss_fn, phi, (sx, sy), query_grad, lam=s.lam, cg_steps=s.cg_steps)
    return solved.x


def maml(net: nn.Module, ep: tuple[Tensor, ...], s: Setting) -> dict[str, Tensor]:
    """Second-order MAML's per-task meta-gradients ``[T, ...]``."""
    sx, sy, qx, qy = ep
    grads, _, _ = maml_meta_grads(FoldedBackend(net), loss_for(qy), params_of(net), (sx, sy), (qx, qy), s.maml_steps,
                                  s.inner_lr)
    return grads


METHODS: dict[str, Callable[[nn.Module, tuple, Setting], dict[str, Tensor]]] = {"iMAML": imaml, "MAML": maml}


def episode(s: Setting, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random images of Omniglot's shape: support ``[T, n_way * k_shot, 1, 28, 28]``, query ``[T, n_way * k_query,
    ...]``, labels 0..n_way-1."""
    g = torch.Generator().manual_seed(seed)
    t = s.meta_batch
    sy = torch.arange(s.n_way).repeat_interleave(s.k_shot).expand(t, -1).contiguous()
    qy = torch.arange(s.n_way).repeat_interleave(s.k_query).expand(t, -1).contiguous()
    return (torch.rand(t, sy.shape[1], 1, 28, 28, generator=g), sy, torch.rand(t, qy.shape[1], 1, 28, 28, generator=g),
            qy)


def relative_error(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    fa, fb = (torch.cat([d[k].double().reshape(-1) for k in b]) for d in (a, b))
    return float((fa - fb).norm() / fb.norm().clamp_min(1e-30))


def median_task_error(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """The median over tasks of the relative error of per-task meta-gradients ``a`` against ``b``."""
    fa, fb = (torch.cat([d[k].double().flatten(1) for k in b], dim=1) for d in (a, b))
    return float(((fa - fb).norm(dim=1) / fb.norm(dim=1).clamp_min(1e-30)).median())


# --------------------------------------------------------------------------- measuring

Cell = tuple[str, str, frozenset[str]]  # (pool, method, patched names)


@dataclass
class Timings:
    """Per cell, one entry per timed round: the process's CPU seconds (user + system; one torch thread, so the
    other jobs on shared cores inflate it far less than wall time) and wall seconds."""

    cpu: dict[Cell, list[float]]
    wall: dict[Cell, list[float]]


def cells_to_time(pools: list[str], methods: list[str]) -> list[Cell]:
    """(pool, method, variant) for every variant that changes what runs on that net (the first of equal ones)."""
    cells = []
    for pool in pools:
        seen: set[frozenset[str]] = set()
        for variant in VARIANTS:
            eff = effective(pool, variant)
            if eff in seen or (variant and not eff):
                continue
            seen.add(eff)
            cells += [(pool, m, variant) for m in methods]
    return cells


def in_float64(net: nn.Module, ep: tuple, tasks: int, method: str, variant: frozenset[str], s: Setting
               ) -> dict[str, Tensor]:
    """``method``'s meta-gradient in float64 on the first ``tasks`` tasks, the net converted and back."""
    ep64 = tuple((t.double() if t.is_floating_point() else t)[:tasks] for t in ep)
    try:
        with patched(variant):
            return METHODS[method](net.double(), ep64, s)
    finally:
        net.float()


def guard(s: Setting, nets_by_pool: dict[str, Conv4], ep: tuple, cells: list[Cell]) -> dict[Cell, float]:
    """Every variant's meta-gradient against the all-kernels one, float64, first 2 tasks; stops on a mismatch."""
    errors, reference = {}, {}
    for pool, method, variant in cells:
        out = in_float64(nets_by_pool[pool], ep, 2, method, variant, s)
        if not variant:
            reference[(pool, method)] = out
        errors[(pool, method, variant)] = err = relative_error(out, reference[(pool, method)])
        if not err < GUARD_TOL:
            raise SystemExit(f"{pool} {method} {variant_name(variant)}: meta-gradient differs from all kernels' "
                             f"(relative error {err:.1e}, float64): the timings would compare different computations")
    return errors


def measure(s: Setting, nets_by_pool: dict[str, Conv4], ep: tuple, cells: list[Cell], repeats: int
            ) -> tuple[Timings, dict[Cell, dict[str, Tensor]]]:
    """Timings of ``repeats`` rounds after a warm-up round (dropped), round-robin over the cells with their order
    rotated each round; and each cell's float32 meta-gradient (from the warm-up round)."""
    timings = Timings({c: [] for c in cells}, {c: [] for c in cells})
    grads: dict[Cell, dict[str, Tensor]] = {}
    for r in range(repeats + 1):
        shift = r % len(cells)
        for cell in cells[shift:] + cells[:shift]:
            pool, method, variant = cell
            with patched(variant):
                wall, cpu = time.perf_counter(), time.process_time()
                out = METHODS[method](nets_by_pool[pool], ep, s)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if r == 0:
                grads[cell] = out
            else:
                timings.cpu[cell].append(cpu)
                timings.wall[cell].append(wall)
        print(f"  round {r}/{repeats} done{' (warm-up)' if r == 0 else ''}", flush=True)
    return timings, grads


Speedup = tuple[str, str, str, str, list[float], float]  # kernel, pool, method, pair, per-round CPU ratios, wall


def speedups(t: Timings) -> list[Speedup]:
    """Per kernel and (net, method) where it runs: the smallest timed variant without the kernel against the same
    variant with it; the per-round ratios of CPU time, and the ratio of the wall-time medians."""
    rows = []
    timed: dict[tuple[str, str], set[frozenset[str]]] = {}
    for pool, method, variant in t.cpu:
        timed.setdefault((pool, method), set()).add(variant)
    for kernel in ("grouped_conv", "batch_norm", "max_pool", "conv_bn_relu_max_pool", "all"):
        for (pool, method), variants in timed.items():
            if kernel == "all":
                pair = (frozenset(PLAIN), frozenset())
            else:
                bases = sorted((v for v in variants if kernel not in v and (v | {kernel}) in variants
                                and kernel in effective(pool, v | {kernel})), key=len)
                if not bases:
                    continue
                pair = (bases[0] | {kernel}, bases[0])
            if pair[0] not in variants or pair[1] not in variants:
                continue
            without, with_ = (pool, method, pair[0]), (pool, method, pair[1])
            rows.append((kernel, pool, method, f"{variant_name(pair[0])} / {variant_name(pair[1])}",
                         [a / b for a, b in zip(t.cpu[without], t.cpu[with_])],
                         statistics.median(t.wall[without]) / statistics.median(t.wall[with_])))
    return rows


def pays(ratios: list[float]) -> bool:
    """Median speedup >= :data:`PAYS` and every round's above 1: beyond the repeat-to-repeat spread."""
    return statistics.median(ratios) >= PAYS and min(ratios) > 1.0


def print_tables(s: Setting, t: Timings, errors64: dict[Cell, float], errors32: dict[Cell, float],
                 repeats: int) -> list[Speedup]:
    print(f"\nms per meta-gradient of the meta-batch ({s.n_way}w{s.k_shot}s, {s.k_query} queries/class, meta-batch "
          f"{s.meta_batch}, Conv-4 {s.hidden} ch; iMAML {s.inner_steps} GD steps + {s.cg_steps} CG steps, MAML "
          f"{s.maml_steps} steps), medians of {repeats} round{'s' if repeats > 1 else ''}, torch threads "
          f"{torch.get_num_threads()}; cpu: the process's CPU time, spread: (max - min) / median; err f64: relative "
          f"error of the meta-gradients against all kernels' (float64, 2 tasks); err f32: float32 against all kernels' "
          f"float64, median over the tasks")
    header = (f"{'net':<6} | {'method':<6} | {'variant':<26} | {'cpu ms':>8} | {'spread':>6} | {'x all':>6} | "
              f"{'wall ms':>8} | {'spread':>6} | {'err f64':>7} | {'err f32':>7}")
    print(header)
    print("-" * len(header))
    for cell, cpu in t.cpu.items():
        pool, method, variant = cell
        wall = t.wall[cell]
        med, wmed = statistics.median(cpu), statistics.median(wall)
        base = statistics.median(t.cpu[(pool, method, frozenset())])
        print(f"{pool:<6} | {method:<6} | {variant_name(variant):<26} | {1e3 * med:8.1f} | "
              f"{(max(cpu) - min(cpu)) / med:6.1%} | {med / base:5.2f}x | {1e3 * wmed:8.1f} | "
              f"{(max(wall) - min(wall)) / wmed:6.1%} | {errors64[cell]:7.1e} | {errors32[cell]:7.1e}")
    rows = speedups(t)
    print(f"\nspeedup of each kernel: time without it / time with it; cpu: per round, median [min, max] of {repeats}; "
          f"wall: ratio of the medians. Pays: cpu median >= {PAYS} and min > 1 on some row")
    header = f"{'kernel':<22} | {'net':<6} | {'method':<6} | {'without / with':<46} | {'cpu':>20} | {'wall':>6}"
    print(header)
    print("-" * len(header))
    for kernel, pool, method, pair, ratios, wall in rows:
        print(f"{kernel:<22} | {pool:<6} | {method:<6} | {pair:<46} | {statistics.median(ratios):5.2f}x "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] | {wall:5.2f}x")
    verdicts: dict[str, bool] = {}
    for kernel, _, _, _, ratios, _ in rows:
        if kernel != "all":
            verdicts[kernel] = verdicts.get(kernel, False) or pays(ratios)
    print("\n" + "; ".join(f"{k}: {'pays' if v else 'does not pay'}" for k, v in verdicts.items()))
    return rows


def plot(path: str, t: Timings, pools: list[str], methods: list[str], s: Setting) -> None:
    """One panel per (net, method): CPU ms per variant, the median with the repeats' range."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    fig, axes = plt.subplots(len(pools), len(methods), figsize=(5.5 * len(methods), 3.8 * len(pools)), squeeze=False)
    for i, pool in enumerate(pools):
        for j, method in enumerate(methods):
            ax = axes[i][j]
            cells = [(v, ts) for (p, m, v), ts in t.cpu.items() if (p, m) == (pool, method)]
            meds = [1e3 * statistics.median(ts) for _, ts in cells]
            err = [[m - 1e3 * min(ts) for m, (_, ts) in zip(meds, cells)],
                   [1e3 * max(ts) - m for m, (_, ts) in zip(meds, cells)]]
            bars = ax.bar(range(len(cells)), meds, yerr=err, capsize=3,
                          color=["tab:green" if not v else "tab:red" if v == set(PLAIN) else "tab:blue"
                                 for v, _ in cells])
            ax.bar_label(bars, [f"{m:.0f}" for m in meds], fontsize=6, padding=2)
            ax.set_xticks(range(len(cells)), [variant_name(v).replace(", ", ",\n") for v, _ in cells], fontsize=6,
                          rotation=30, ha="right")
            ax.set_ylabel("CPU ms per meta-gradient (1 thread)")
            ax.set_title(f"Conv-4 {s.hidden} ch pool={pool}, {method}, meta-batch {s.meta_batch}", fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds after one warm-up (default 7)")
    parser.add_argument("--meta-batch", type=int, default=32, help="tasks per meta-gradient (default 32)")
    parser.add_argument("--methods", default="imaml,maml", help="comma-separated subset of imaml, maml")
    parser.add_argument("--pools", default="stride,max", help="comma-separated subset of stride, max (Conv4's pool)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 tasks, hidden 8, 2 steps, 1 repeat")
    parser.add_argument("--plot", default=None,
                        help="bar chart path (default docs/kernels.png; with --quick a file in the temporary folder)")
    args = parser.parse_args()
    by_alias = {m.lower(): m for m in METHODS}
    methods = [by_alias[m.strip().lower()] for m in args.methods.split(",") if m.strip().lower() in by_alias]
    pools = [p for p in POOLS if p in {q.strip() for q in args.pools.split(",")}]
    if not methods or not pools or args.repeats < 1 or args.threads < 1:
        parser.error("--methods needs imaml and/or maml, --pools stride and/or max; --repeats and --threads must be "
                     ">= 1")
    s, repeats = Setting(meta_batch=args.meta_batch), args.repeats
    if args.quick:
        s, repeats = replace(s, meta_batch=2, hidden=8, inner_steps=2, cg_steps=2, maml_steps=1), 1
    plot_path = args.plot or (str(Path(tempfile.gettempdir()) / "kernels_quick.png") if args.quick
                              else str(REPO / "docs" / "kernels.png"))

    torch.set_num_threads(args.threads)
    print(machine_line(malloc_kept=keep_freed_memory()))
    if args.quick:
        print("--quick: tiny sizes for a smoke test; the timings mean nothing")
    gone = set(PLAIN) - kernels_present()
    if gone:
        print(f"kernels no longer in the library (forward_tasks calls the plain op): {', '.join(sorted(gone))}")
    torch.manual_seed(0)
    nets_by_pool = {pool: Conv4(out_features=s.n_way, hidden=s.hidden, pool=pool) for pool in POOLS}  # same seeds
    ep = episode(s)
    cells = cells_to_time(pools, methods)
    print(f"{len(cells)} cells (net x method x variant), {repeats} round{'s' if repeats > 1 else ''} after a warm-up; "
          f"guard first (float64, 2 tasks)", flush=True)
    errors64 = guard(s, nets_by_pool, ep, cells)
    truth = {(pool, m): in_float64(nets_by_pool[pool], ep, s.meta_batch, m, frozenset(), s)
             for pool in pools for m in methods}
    timings, grads = measure(s, nets_by_pool, ep, cells, repeats)
    errors32 = {c: median_task_error(g, truth[c[:2]]) for c, g in grads.items()}
    print_tables(s, timings, errors64, errors32, repeats)
    plot(plot_path, timings, pools, methods, s)


if __name__ == "__main__":
    main()
