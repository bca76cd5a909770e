"""Meta-training throughput: tasks/s of one full meta-update, our batched code against per-task loops.

What it measures: Omniglot 5-way 1-shot episodes (5 queries per class), meta-batch 32, Conv-4 with 64
channels in both variants (``pool="stride"``, MAML's Omniglot net, and ``pool="max"``). Each method
computes the meta-gradient of the whole meta-batch, averages it over tasks into ``p.grad`` and takes one
Adam step on the network; a meta-update is timed end to end and reported as tasks/s = 32 / seconds
(median over ``--repeats`` after one warm-up update). All methods run in ONE process, on the SAME
episodes, from the SAME initial weights (a ``copy.deepcopy`` of one Conv4 per variant), the repeats
taken round-robin over the methods so that background load hits them alike.

  ours iMAML-GD                 lit_meta.functional, batched over tasks (what ``IMAML.task_meta_grads``
                                runs): inner_solve (GD, 16 steps, lam 2, inner lr 0.1) -> query
                                gradients -> implicit_meta_grad (5 CG steps) -> mean -> Adam. For Conv4
                                the functions take its all-tasks forward (``Conv4.forward_tasks``: tasks
                                folded into grouped convolutions, no vmap) and build the Hessian's graph
                                once per CG solve (each product one double backward).
  ours MAML (2nd order)         maml_meta_grads, the same 16 inner steps and inner lr.
  ours FOMAML                   inner_solve (lam 0) -> query gradients at the adapted weights.
  loop iMAML (reference-style)  a Python loop over tasks written like the iMAML authors' code: copy the
                                model's weights, 16 SGD steps on the proximal objective
                                (torch.autograd.grad), query gradient, 5 CG steps with double-backward
                                HVPs (CG truncated at non-positive curvature, as ours).
  learn2learn MAML (2nd order)  learn2learn's MAML looped over tasks as in its examples: maml.clone(),
                                learner.adapt(loss) x steps (``--l2l-steps``), query loss backward.

Before timing, a guard checks that "ours iMAML-GD" and the loop give the same meta-gradient on the first
episode (relative error < 1e-6, computed in float64, printed; the run stops if it is larger: the comparison would
not be fair), and reports the same check for our MAML against learn2learn's.

Targets (reported, never enforced): ours iMAML-GD >= 2.5x the loop (>= 20x with --device cuda) and >= 3x learn2learn MAML in
tasks/s; a WARNING line is printed for each missed target.

    python benchmarks/meta_throughput.py                       # 5w1s, 16 inner steps, current threads
    python benchmarks/meta_throughput.py --threads 1 2 4 --repeats 5
    python benchmarks/meta_throughput.py --full                # + 20w1s, 25 inner steps, meta-batch 16
    python benchmarks/meta_throughput.py --methods "ours iMAML-GD,loop iMAML (reference-style)"
    python benchmarks/meta_throughput.py --phases --methods imaml,loop  # + ms per phase, ours vs the loop, and
                                                                  # the ceiling that convolution time sets
    python benchmarks/meta_throughput.py --quick               # smoke test: 2 tasks, 2 steps, hidden 8
    python benchmarks/meta_throughput.py --device cuda --full  # on a GPU (target there: >= 20x the loop)

Run it on a quiet machine: tasks/s depend on every core being free. Writes a bar chart to
docs/meta_throughput.png (``--plot``; with ``--quick`` to the temporary folder unless ``--plot`` is
given). Data: $LIT_META_DATA/omniglot (default ../shared/data/omniglot, from the repository root).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_meta.allocator import keep_freed_memory
from lit_meta.datamodules import OmniglotDataModule
from lit_meta.episode import Episode, to_float
from lit_meta.backends import task_backend
from lit_meta.functional import Params, implicit_meta_grad, inner_solve, loss_for, maml_meta_grads, params_of
from lit_meta.nets import Conv4

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line, save_figure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("stride", "max")
TARGET_VS_LOOP, TARGET_VS_L2L = 2.5, 3.0
TARGET_VS_LOOP_GPU = 20.0
GUARD_TOL = 1e-6


@dataclass(frozen=True)
class Setting:
    """One benchmark configuration (an episode shape and the algorithms' hyper-parameters)."""

    n_way: int
    k_shot: int = 1
    k_query: int = 5
    meta_batch: int = 32
    inner_steps: int = 16
    inner_lr: float = 0.1
    lam: float = 2.0
    cg_steps: int = 5
    cg_tol: float = 1e-10  # IMAML's default
    hidden: int = 64
    l2l_steps: int | None = None  # None: inner_steps
    maml_task_chunk: int | None = None  # ours MAML on this many tasks at a time (MAML's task_chunk_size); None: all

    @property
    def name(self) -> str:
        return f"{self.n_way}w{self.k_shot}s"

    @property
    def l2l_inner_steps(self) -> int:
        return self.inner_steps if self.l2l_steps is None else self.l2l_steps


# --------------------------------------------------------------------------- the methods
# Each returns the meta-gradient of the whole meta-batch (mean over tasks), one tensor per named parameter
# of ``net``; :func:`meta_update` turns it into p.grad and the Adam step.

def ours_imaml(net: nn.Module, ep: Episode, s: Setting) -> Params:
    """iMAML-GD batched over tasks with lit_meta.functional (mirrors ``IMAML.task_meta_grads``)."""
    loss_fn = loss_for(ep.query_y)
    phi, _ = inner_solve(task_backend(net), loss_fn, params_of(net), ep.support_x, ep.support_y, lam=s.lam,
                         inner_steps=s.inner_steps, inner_lr=s.inner_lr, solver="gd")          # Eq. 4
    query_grad, _, _ = task_backend(net).grads_and_outputs(loss_fn, phi, ep.query_x, ep.query_y)
    solved = implicit_meta_grad(task_backend(net), loss_fn, phi, (ep.support_x, ep.support_y), query_grad,
                                lam=s.lam, cg_steps=s.cg_steps, cg_tol=s.cg_tol)            # Eq. 6-7
    return {k: g.mean(0) for k, g in solved.x.items()}


def ours_maml(net: nn.Module, ep: Episode, s: Setting) -> Params:
    """Second-order MAML batched over tasks (mirrors ``MAML.task_meta_grads``), ``s.maml_task_chunk`` tasks at a
    time when set (as ``MAML(task_chunk_size=...)``: its memory grows with tasks x inner steps)."""
    chunk = s.maml_task_chunk or ep.n_tasks
    total: Params = {}
    for start in range(0, ep.n_tasks, chunk):
        part = Episode(*(t[start:start + chunk] for t in ep))
        grads, _, _ = maml_meta_grads(task_backend(net), loss_for(part.query_y), params_of(net), (part.support_x, part.support_y),
                                      (part.query_x, part.query_y), s.inner_steps, s.inner_lr)
        total = {k: g.sum(0) + total.get(k, 0) for k, g in grads.items()}
    return {k: g / ep.n_tasks for k, g in total.items()}


def ours_fomaml(net: nn.Module, ep: Episode, s: Setting) -> Params:
    """First-order MAML batched over tasks (mirrors ``MAML.task_meta_grads`` with ``first_order=True``)."""
    loss_fn = loss_for(ep.query_y)
    phi, _ = inner_solve(task_backend(net), loss_fn, params_of(net), ep.support_x, ep.support_y, lam=0.0,
                         inner_steps=s.inner_steps, inner_lr=s.inner_lr)
    grads, _, _ = task_backend(net).grads_and_outputs(loss_fn, phi, ep.query_x, ep.query_y)
    return {k: g.mean(0) for k, g in grads.items()}


def _flat(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    return torch.cat([t.contiguous().view(-1) for t in tensors])


def _reference_cg(matvec: Callable[[Tensor], Tensor], b: Tensor, steps: int, tol: float) -> Tensor:
    """Conjugate gradient on flat vectors from x = 0, after the authors' ``utils.cg_solve``, with two changes
    that make it compute exactly what :func:`lit_meta.functional.cg` computes: it stops at a direction of
    non-positive curvature (p^T A p <= 0: truncated CG; the system (I + H/lam) is indefinite where H has
    eigenvalues below -lam) and at a residual <= tol * ||b||. It also starts from r = b instead of spending
    one more HVP on b - A 0 (which would only slow the loop down)."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rdotr = r.dot(r)
    stop = rdotr * tol ** 2
    for _ in range(steps):
        if rdotr <= stop:
            break
        ap = matvec(p)
        pap = p.dot(ap)
        if pap <= 0:
            break
        alpha = rdotr / pap
        x = x + alpha * p
        r = r - alpha * ap
        new_rdotr = r.dot(r)
        p = r + new_rdotr / rdotr * p
        rdotr = new_rdotr
    return x


def _loop_implicit_grad(fast: nn.Module, params: list[Tensor], sx: Tensor, sy: Tensor, query_grad: Tensor,
                        s: Setting) -> Tensor:
    """One task's (I + H / lam)^-1 query_grad at ``fast``'s weights, as the reference code: CG whose every Hessian-vector
    product is reverse-over-reverse with a fresh forward and first backward."""
    def hessian_vector_product(v: Tensor) -> Tensor:
        g = _flat(torch.autograd.grad(F.cross_entropy(fast(sx), sy), params, create_graph=True))
        return _flat(torch.autograd.grad(g.dot(v), params))

    return _reference_cg(lambda v: v + hessian_vector_product(v) / s.lam, query_grad, s.cg_steps, s.cg_tol)


def loop_imaml(net: nn.Module, ep: Episode, s: Setting) -> Params:
    """iMAML-GD one task at a time, written like the authors' reference code (aravindr93/imaml_dev,
    examples/omniglot_implicit_maml.py): one fast learner whose weights are reset to theta per task."""
    theta = [p.detach() for p in net.parameters()]
    fast = copy.deepcopy(net)
    params = list(fast.parameters())
    meta_grad = torch.zeros_like(_flat(theta))
    for i in range(ep.n_tasks):
        sx, sy, qx, qy = ep.support_x[i], ep.support_y[i], ep.query_x[i], ep.query_y[i]
        with torch.no_grad():  # set_params(theta)
            for p, t in zip(params, theta):
                p.copy_(t)
        for _ in range(s.inner_steps):  # SGD on L_train(phi) + lam/2 ||phi - theta||^2
            regu = sum(((p - t) ** 2).sum() for p, t in zip(params, theta))
            loss = F.cross_entropy(fast(sx), sy) + 0.5 * s.lam * regu
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(s.inner_lr * g)
        query_grad = _flat(torch.autograd.grad(F.cross_entropy(fast(qx), qy), params))
        meta_grad += _loop_implicit_grad(fast, params, sx, sy, query_grad, s) / ep.n_tasks
    chunks = torch.split(meta_grad, [t.numel() for t in theta])
    return {name: chunk.view_as(p) for (name, p), chunk in zip(net.named_parameters(), chunks)}


def l2l_maml(net: nn.Module, ep: Episode, s: Setting) -> Params:
    """learn2learn's second-order MAML looped over tasks as in its examples (e.g. maml_omniglot.py)."""
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(net, lr=s.inner_lr, first_order=False)
    maml.zero_grad(set_to_none=True)
    for i in range(ep.n_tasks):
        learner = maml.clone()
        for _ in range(s.l2l_inner_steps):
            learner.adapt(F.cross_entropy(learner(ep.support_x[i]), ep.support_y[i]))
        F.cross_entropy(learner(ep.query_x[i]), ep.query_y[i]).backward()
    return {n: p.grad / ep.n_tasks for n, p in net.named_parameters()}


METHODS: dict[str, Callable[[nn.Module, Episode, Setting], Params]] = {
    "ours iMAML-GD": ours_imaml,
    "ours MAML (2nd order)": ours_maml,
    "ours FOMAML": ours_fomaml,
    "loop iMAML (reference-style)": loop_imaml,
    "learn2learn MAML (2nd order)": l2l_maml,
}
ALIASES = {"imaml": "ours iMAML-GD", "maml": "ours MAML (2nd order)", "fomaml": "ours FOMAML",
           "loop": "loop iMAML (reference-style)", "l2l": "learn2learn MAML (2nd order)"}
OURS, LOOP, L2L = "ours iMAML-GD", "loop iMAML (reference-style)", "learn2learn MAML (2nd order)"


# --------------------------------------------------------------------------- timing

def meta_update(net: nn.Module, optimizer: torch.optim.Optimizer, grads: Params) -> None:
    """theta.grad = the meta-gradient, then one outer Adam step."""
    optimizer.zero_grad(set_to_none=True)
    for name, p in net.named_parameters():
        p.grad = grads[name].reshape(p.shape).to(p.dtype)
    optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> float:
    """Wall time of one call of ``fn``, with the device's queued work finished before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def timed_update(method: Callable, net: nn.Module, optimizer: torch.optim.Optimizer, ep: Episode,
                 s: Setting) -> float:
    return seconds(lambda: meta_update(net, optimizer, method(net, ep, s)), next(net.parameters()).device)


def relative_error(a: Params, b: Params) -> float:
    fa = torch.cat([a[k].reshape(-1) for k in b])
    fb = torch.cat([b[k].reshape(-1) for k in b])
    return float((fa - fb).norm() / fb.norm().clamp_min(1e-30))


def guard(base: nn.Module, ep: Episode, s: Setting, variant: str, methods: list[str]) -> None:
    """Same meta-gradient on the first episode, from the same weights: ours iMAML-GD vs the loop (required),
    ours MAML vs learn2learn's (reported)."""
    for ours, ref, required in ((OURS, LOOP, True), ("ours MAML (2nd order)", L2L, False)):
        if ours not in methods or ref not in methods or (ref == L2L and s.l2l_inner_steps != s.inner_steps):
            continue
        # in float64: in float32 BatchNorm over 5 images amplifies rounding differences between kernels
        # (and 16 inner steps compound them) to ~1e-3 relative, which says nothing about the algorithm
        # (on the first 2 tasks: second-order MAML in float64 on 32 tasks, or 20-way on 4, needs > 24 GiB)
        ep64 = Episode(*((t.double() if t.is_floating_point() else t)[:2] for t in ep))
        err = relative_error(METHODS[ours](copy.deepcopy(base).double(), ep64, s),
                             METHODS[ref](copy.deepcopy(base).double(), ep64, s))
        ok = err < GUARD_TOL
        print(f"guard {s.name} {variant:>6}: {ours} vs {ref}: relative error of the meta-gradient {err:.2e} "
              f"({'OK' if ok else 'MISMATCH'}, tolerance {GUARD_TOL:g})")
        if required and not ok:
            raise SystemExit(f"{ours} and {ref} disagree on the meta-gradient: the timings would compare different "
                             f"computations; not timing")


def run_setting(s: Setting, methods: list[str], episodes: list[Episode], repeats: int) -> dict[tuple[str, str], float]:
    """tasks/s per (variant, method): warm-up on episodes[0], then ``repeats`` round-robin timed updates, on the
    episodes' device."""
    results: dict[tuple[str, str], float] = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        base = Conv4(out_features=s.n_way, hidden=s.hidden, pool=variant).to(episodes[0].support_x.device)
        guard(base, episodes[0], s, variant, methods)
        nets = {m: copy.deepcopy(base) for m in methods}
        optimizers = {m: torch.optim.Adam(nets[m].parameters(), lr=1e-3) for m in methods}
        times: dict[str, list[float]] = {m: [] for m in methods}
        failed: set[str] = set()
        for r in range(repeats + 1):  # r = 0: warm-up, not recorded
            for m in methods:
                if m in failed:
                    continue
                try:
                    t = timed_update(METHODS[m], nets[m], optimizers[m], episodes[r], s)
                except (RuntimeError, MemoryError) as e:  # e.g. out of memory: report, keep the others
                    print(f"{s.name} {variant} {m}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                    failed.add(m)
                    continue
                if r > 0:
                    times[m].append(t)
        for m in methods:
            if m not in failed:
                results[(variant, m)] = s.meta_batch / statistics.median(times[m])
    return results


CONV_KERNELS = ("aten::mkldnn_convolution", "aten::convolution_backward")  # where a CPU convolution's time is spent


def conv_share(fn: Callable[[], object], repeats: int) -> float:
    """The fraction of ``fn``'s wall time spent inside convolution kernels (forward and backward, the derivatives'
    convolutions included): torch.profiler's self CPU time of :data:`CONV_KERNELS` over the wall time of the same
    profiled call, median of ``repeats`` calls (a fraction, so that a slower moment of a noisy machine during the
    profiled calls does not count as convolution time)."""
    from torch.profiler import ProfilerActivity, profile

    shares = []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            fn()
            wall = time.perf_counter() - start
        conv = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in CONV_KERNELS) / 1e6
        shares.append(conv / wall)
    return statistics.median(shares)


def gflops(fn: Callable[[], object], flop: float, repeats: int = 10) -> float:
    """GFLOP/s of ``fn`` (which does ``flop`` floating-point operations), median of ``repeats`` after 2 warm-ups."""
    for _ in range(2):
        fn()
    return flop / statistics.median(seconds(fn) for _ in range(repeats)) / 1e9


def compute_peak(s: Setting) -> str:
    """On CPU, how fast the convolutions already run: GFLOP/s of a 2048^3 float32 matmul (the machine's practical
    peak) beside the max-pool net's second convolution on the support set (grouped, one group per task)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    n, c = s.n_way * s.k_shot, s.hidden
    x, w = torch.randn(n, s.meta_batch * c, 14, 14), torch.randn(s.meta_batch * c, c, 3, 3)
    matmul = gflops(lambda: a @ b, 2 * 2048 ** 3)
    conv = gflops(lambda: F.conv2d(x, w, padding=1, groups=s.meta_batch), 2 * n * s.meta_batch * c * c * 9 * 14 * 14)
    return (f"float32 GFLOP/s at {torch.get_num_threads()} threads: 2048^3 matmul {matmul:.0f}, the max-pool net's "
            f"layer-2 grouped convolution ({n} x {s.meta_batch * c} x 14 x 14, {s.meta_batch} groups) {conv:.0f}")


def phase_times(s: Setting, episode: Episode, repeats: int) -> None:
    """``--phases``: where ours gains on the loop. At the same adapted weights phi (ours' inner solve from the same
    initial theta), times each phase of one meta-update for the whole meta-batch, ours batched against the loop's
    one task at a time (the same code as ``loop_imaml``): one support gradient (an inner step, ``inner_steps`` of
    them per update), the query gradient, and the CG solve (``cg_steps`` Hessian-vector products). Medians, round
    robin. On CPU also the part of each spent in convolution kernels (oneDNN's, which ours and the loop both call;
    :func:`conv_share`): "ceiling: loop / ours convs" is the most ours could gain on the loop with these kernels and
    convolution FLOPs, i.e. if all its other work took no time; last, the GFLOP/s the convolutions run at beside a
    large matmul's (:func:`compute_peak`)."""
    sx, sy, qx, qy = episode
    on_cpu = sx.device.type == "cpu"
    for variant in VARIANTS:
        torch.manual_seed(0)
        net = Conv4(out_features=s.n_way, hidden=s.hidden, pool=variant).to(sx.device)
        loss_fn = loss_for(qy)
        phi, _ = inner_solve(task_backend(net), loss_fn, params_of(net), sx, sy, lam=s.lam, inner_steps=s.inner_steps,
                             inner_lr=s.inner_lr, solver="gd")
        query_grad, _, _ = task_backend(net).grads_and_outputs(loss_fn, phi, qx, qy)
        fast = copy.deepcopy(net)
        params = list(fast.parameters())

        def per_task(step: Callable[[int], object]) -> None:  # the loop: load task i's phi, run the step
            for i in range(episode.n_tasks):
                with torch.no_grad():
                    for name, p in fast.named_parameters():
                        p.copy_(phi[name][i])
                step(i)

        def loop_grad(x: Tensor, y: Tensor) -> None:
            per_task(lambda i: torch.autograd.grad(F.cross_entropy(fast(x[i]), y[i]), params))

        def loop_cg(i: int) -> None:
            b = _flat([query_grad[n][i] for n, _ in fast.named_parameters()])
            _loop_implicit_grad(fast, params, sx[i], sy[i], b, s)

        cg_name = f"CG solve ({s.cg_steps} HVPs)"
        phases = {
            "support gradient": (lambda: task_backend(net).grads_and_outputs(loss_fn, phi, sx, sy), lambda: loop_grad(sx, sy)),
            "query gradient": (lambda: task_backend(net).grads_and_outputs(loss_fn, phi, qx, qy), lambda: loop_grad(qx, qy)),
            cg_name: (
                lambda: implicit_meta_grad(task_backend(net), loss_fn, phi, (sx, sy), query_grad, lam=s.lam, cg_steps=s.cg_steps,
                                           cg_tol=s.cg_tol),
                lambda: per_task(loop_cg)),
        }
        times: dict[tuple[str, int], list[float]] = {}
        for r in range(repeats + 1):  # r = 0: warm-up
            for name, fns in phases.items():
                for j, fn in enumerate(fns):
                    t = seconds(fn, sx.device)
                    if r > 0:
                        times.setdefault((name, j), []).append(t)
        ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
        conv = {(name, j): conv_share(fn, repeats) * ms[(name, j)] for name, fns in phases.items()
                for j, fn in enumerate(fns)} if on_cpu else {}  # ms in convolution kernels
        # one meta-update = inner_steps support gradients + the query gradient + the CG solve (the GD updates' few
        # elementwise operations aside)
        count = {"support gradient": s.inner_steps, "query gradient": 1, cg_name: 1}
        total = f"meta-update ({s.inner_steps} x support + query + CG)"
        for source in (ms, conv) if on_cpu else (ms,):
            source.update({(total, j): sum(count[name] * source[(name, j)] for name in phases) for j in (0, 1)})
        print(f"\nphases, {s.name} {variant}, meta-batch {episode.n_tasks}, torch threads {torch.get_num_threads()} "
              f"(ms for the whole meta-batch, medians of {repeats}; 'convs': the part in convolution kernels)")
        header = f"{'phase':<40} | {'ours':>8} | {'loop':>8} | {'loop / ours':>11}"
        if on_cpu:
            header += f" | {'ours convs':>10} | {'loop convs':>10} | {'ceiling: loop / ours convs':>26}"
        print(header)
        for name in (*phases, total):
            ours_ms, loop_ms = ms[(name, 0)], ms[(name, 1)]
            line = f"{name:<40} | {ours_ms:8.1f} | {loop_ms:8.1f} | {loop_ms / ours_ms:10.2f}x"
            if on_cpu:
                line += (f" | {conv[(name, 0)]:10.1f} | {conv[(name, 1)]:10.1f} | "
                         f"{loop_ms / conv[(name, 0)]:25.2f}x")
            print(line)
    if on_cpu:
        print(compute_peak(s))


def ratio(results: dict[tuple[str, str], float], variant: str, method: str, ref: str) -> float | None:
    if (variant, method) in results and (variant, ref) in results:
        return results[(variant, method)] / results[(variant, ref)]
    return None


def print_table(s: Setting, threads: int, methods: list[str], results: dict[tuple[str, str], float],
                target_vs_loop: float = TARGET_VS_LOOP) -> list[str]:
    """The table of one (thread count, setting); returns the warnings of missed targets."""
    l2l_note = "" if s.l2l_inner_steps == s.inner_steps else f", learn2learn {s.l2l_inner_steps} steps"
    if s.maml_task_chunk:
        l2l_note += f", our MAML {s.maml_task_chunk} tasks at a time"
    print(f"\n{s.name}, {s.k_query} queries/class, meta-batch {s.meta_batch}, {s.inner_steps} inner steps{l2l_note}, "
          f"Conv-4 {s.hidden} ch, torch threads {threads}")
    header = f"{'variant':>7} | {'method':<28} | {'tasks/s':>9} | {'x vs loop':>9} | {'x vs l2l MAML':>13}"
    print(header)
    print("-" * len(header))
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    for variant in VARIANTS:
        for m in methods:
            if (variant, m) not in results:
                continue
            vs_loop, vs_l2l = fmt(ratio(results, variant, m, LOOP)), fmt(ratio(results, variant, m, L2L))
            print(f"{variant:>7} | {m:<28} | {results[(variant, m)]:>9.2f} | {vs_loop:>9} | {vs_l2l:>13}")
    warnings = []
    where = f"{s.name}, {threads} threads"
    for variant in VARIANTS:
        vs_loop = ratio(results, variant, OURS, LOOP)
        if vs_loop is not None and vs_loop < target_vs_loop:
            warnings.append(f"WARNING: target missed ({where}, pool={variant}): {OURS} is {vs_loop:.2f}x the loop "
                            f"(target >= {target_vs_loop}x)")
        vs_l2l = ratio(results, variant, OURS, L2L)
        if vs_l2l is not None and s.l2l_inner_steps != s.inner_steps:
            print(f"note ({where}, pool={variant}): learn2learn ran {s.l2l_inner_steps} inner steps, ours "
                  f"{s.inner_steps}: the >= {TARGET_VS_L2L}x target is not checked")
        elif vs_l2l is not None and vs_l2l < TARGET_VS_L2L:
            warnings.append(f"WARNING: target missed ({where}, pool={variant}): {OURS} is {vs_l2l:.2f}x learn2learn "
                            f"MAML (target >= {TARGET_VS_L2L}x)")
    for w in warnings:
        print(w)
    return warnings


def plot(path: str, rows: list[tuple[int, Setting, dict[tuple[str, str], float]]], methods: list[str]) -> None:
    """Bar chart: one panel per (setting, variant), tasks/s per method, one bar colour per thread count."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    settings = list(dict.fromkeys(s for _, s, _ in rows))
    thread_counts = list(dict.fromkeys(t for t, _, _ in rows))
    fig, axes = plt.subplots(len(settings), len(VARIANTS), figsize=(5.5 * len(VARIANTS), 3.6 * len(settings)),
                             squeeze=False)
    width = 0.8 / len(thread_counts)
    for i, s in enumerate(settings):
        for j, variant in enumerate(VARIANTS):
            ax = axes[i][j]
            for k, threads in enumerate(thread_counts):
                res = next(r for t, st, r in rows if t == threads and st == s)
                xs = [x + (k - (len(thread_counts) - 1) / 2) * width for x in range(len(methods))]
                values = [res.get((variant, m), 0.0) for m in methods]
                bars = ax.bar(xs, values, width, label=f"{threads} threads")
                ax.bar_label(bars, [f"{v:.1f}" if v else "" for v in values], fontsize=6)
            ax.set_xticks(range(len(methods)), [m.replace(" (", "\n(") for m in methods], fontsize=6)
            ax.set_ylabel("tasks/s (meta-training)")
            l2l_note = "" if s.l2l_inner_steps == s.inner_steps else f" (learn2learn {s.l2l_inner_steps})"
            ax.set_title(f"Omniglot {s.name}, {s.inner_steps} inner steps{l2l_note}, Conv-4 pool={variant}",
                         fontsize=8)
            ax.legend(fontsize=6)
    save_figure(fig, path)


def load_episodes(data: Path, cache: str, s: Setting, count: int) -> list[Episode]:
    """The first ``count`` training meta-batches of the seeded episode stream, as float32."""
    dm = OmniglotDataModule(data_dir=str(data), cache_dir=cache, n_way=s.n_way, k_shot=s.k_shot, k_query=s.k_query,
                            meta_batch_size=s.meta_batch, seed=0)
    dm.setup()
    dataset = dm.dataset("train")
    return [to_float(Episode(*dataset[(0, step)])) for step in range(count)]


def parse_methods(text: str | None, parser: argparse.ArgumentParser) -> list[str]:
    if not text:
        return list(METHODS)
    chosen = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name = ALIASES.get(item.lower(), item)
        if name not in METHODS:
            parser.error(f"unknown method {item!r}; choose from {list(METHODS)} or the aliases {list(ALIASES)}")
        chosen.append(name)
    return [m for m in METHODS if m in chosen]  # table order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="torch thread counts, the whole table per count (default: the current count)")
    parser.add_argument("--repeats", type=int, default=3, help="timed meta-updates per method (median reported)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 tasks, 2 inner steps, hidden 8, 1 repeat")
    parser.add_argument("--full", action="store_true", help="also 20-way 1-shot: 25 inner steps, meta-batch 16")
    parser.add_argument("--only-20w", action="store_true", help="with --full: the 20-way 1-shot setting alone")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of {list(METHODS)} (or aliases {', '.join(ALIASES)})")
    parser.add_argument("--l2l-steps", type=int, default=None,
                        help="inner steps of learn2learn MAML (default: the same as the others')")
    parser.add_argument("--data-dir", default=None, help="folder with the Omniglot zips")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where every method runs (default cpu)")
    parser.add_argument("--phases", action="store_true",
                        help="also time each phase (support gradient, query gradient, CG solve), ours against the loop")
    parser.add_argument("--plot", default=None, help="bar chart path (default docs/meta_throughput.png; "
                        "with --quick a file in the temporary folder)")
    args = parser.parse_args()
    methods = parse_methods(args.methods, parser)
    if args.repeats < 1 or min(args.threads) < 1:
        parser.error("--repeats and --threads must be >= 1")
    if args.only_20w and not args.full:
        parser.error("--only-20w goes with --full")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine (torch {torch.__version__})")
    target_vs_loop = TARGET_VS_LOOP_GPU if device.type == "cuda" else TARGET_VS_LOOP
    if L2L in methods:
        try:
            import learn2learn  # noqa: F401
        except Exception as e:  # ImportError, or a broken build
            print(f"{L2L}: skipped (learn2learn does not import: {type(e).__name__}: {e})")
            methods.remove(L2L)

    settings = [Setting(n_way=5, inner_steps=16, l2l_steps=args.l2l_steps)]
    if args.full:
        # meta-batch 16 as MAML's and iMAML's 20-way Omniglot runs; our MAML 4 tasks at a time, its fastest chunk on
        # 2 CPU cores (25 second-order inner steps, max-pool, 2026-12-05: 2 / 4 / 8 / 16 tasks at once 1.01 / 1.18 /
        # 1.14 / 1.12 tasks/s at 1.7 / 3.4 / 6.7 / 13.3 GiB peak; stride-2 2.66 / 2.83 / 2.81 / 2.68 tasks/s)
        settings.append(Setting(n_way=20, inner_steps=25, meta_batch=16, maml_task_chunk=4, l2l_steps=args.l2l_steps))
    if args.only_20w:
        settings = settings[1:]
    repeats = args.repeats
    if args.quick:
        settings = [replace(s, meta_batch=2, inner_steps=2, hidden=8,
                            l2l_steps=None if args.l2l_steps is None else min(args.l2l_steps, 2)) for s in settings]
        repeats = 1
    plot_path = args.plot or (str(Path(tempfile.gettempdir()) / "meta_throughput_quick.png") if args.quick
                              else str(REPO / "docs" / "meta_throughput.png"))
    data = Path(args.data_dir or Path(os.environ.get("LIT_META_DATA", REPO.parent / "shared" / "data")) / "omniglot")

    torch.set_num_threads(args.threads[0])  # so that the machine line names the first table's thread count
    print(machine_line(malloc_kept=keep_freed_memory()))
    if args.quick:
        print("--quick: tiny sizes for a smoke test; its tasks/s and the target checks mean nothing")
    print(f"methods: {', '.join(methods)}; repeats {repeats} after 1 warm-up; inner lr {settings[0].inner_lr}, "
          f"lam {settings[0].lam}, CG steps {settings[0].cg_steps}, outer Adam lr 1e-3")
    rows = []
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    with tempfile.TemporaryDirectory() as cache:
        episodes = {s: [Episode(*(t.to(device) for t in ep)) for ep in load_episodes(data, cache, s, repeats + 1)]
                    for s in settings}
    warnings: list[str] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for s in settings:
            results = run_setting(s, methods, episodes[s], repeats)
            warnings += print_table(s, threads, methods, results, target_vs_loop)
            rows.append((threads, s, results))
    if not warnings and OURS in methods and (LOOP in methods or L2L in methods):
        print(f"\nall targets met (ours iMAML-GD >= {target_vs_loop}x loop, >= {TARGET_VS_L2L}x learn2learn MAML "
              f"where measured)")
    plot(plot_path, rows, methods)
    if args.phases:
        for s in settings:
            phase_times(s, episodes[s][0], repeats)


if __name__ == "__main__":
    main()
