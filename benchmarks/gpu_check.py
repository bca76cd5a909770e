"""The GPU check: every figure a GPU should give, in one call, in one table (under 8 minutes on one GPU).

Sections (each in its own ``try``: a failing section puts its error in the table and the others still run; one
that would start past ``--budget-s`` is skipped, and says so):

  kernels     on the device, float64: Conv4's task-folded path (``Conv4.forward_tasks`` with our custom autograd
              Functions) against the generic ``vmap`` path (the same net wrapped as an arbitrary module), for every
              pool / norm variant: logits, per-task gradients, Hessian-vector products, the iMAML meta-gradient
              (inner solve + CG) and the second-order MAML meta-gradient; forward-over-reverse HVPs against
              reverse-over-reverse; then gradcheck / gradgradcheck (finite differences, forward mode) of each
              custom Function: the grouped convolution and its backward, the channel statistics, the 2 x 2
              max-pool, the fused pool + statistics, BatchNorm (to third order). Then the same folded-vs-vmap
              meta-gradient in float32 (TF32 convolutions as torch's default on the device) and a bfloat16
              autocast forward, reported as relative errors. (tests/test_functional.py checks all of it on CPU.)
  planner     ms per planning call of lit_meta.rl.planners on the device: random shooting (float32 and bf16
              matmuls), CEM and MPPI (5 iterations each), 500 candidates x horizon 10, one env, the paper's MLP
              dynamics (3 x 512, benchmarks/planning.py's ``paper_model``); median of ``--repeats`` calls.
  memory      peak memory of one meta-gradient vs inner steps (benchmarks/memory_vs_inner_steps.py's ``cell``:
              Omniglot 5w1s, Conv-4 64 ch, meta-batch 8): ``torch.cuda.max_memory_allocated`` above the baseline.
              On CPU: peak RSS needs a fresh process per cell, so n/a with --quick, else that script's child runs.
  throughput  benchmarks/meta_throughput.py's ``run_setting``: tasks/s of ours iMAML-GD and MAML (batched, folded
              path) against the per-task loop and learn2learn's MAML ("not installed" when it does not import),
              both Conv-4 variants (stride, max-pool), 5w1s (meta-batch 32, 16 inner steps) and 20w1s
              (meta-batch 16, 25 inner steps), each method guarded first (same meta-gradient as the loop, float64).
  ddp         benchmarks/scaling.py's ``fit_child``: ``train.py fit`` on the quick Omniglot config (40 steps) with 1
              GPU process and, with 2 or more GPUs, 2 (DDP), tasks/s; else "2-process DDP: skipped: 1 GPU".
  tests       the tests that skip without CUDA (found by scanning tests/ for a CUDA skipif), run with pytest on
              this machine when ``--pytest`` is given.

    python benchmarks/gpu_check.py                          # on the GPU (cuda where available), ~5-7 minutes
    python benchmarks/gpu_check.py --pytest                 # + the CUDA-only tests
    python benchmarks/gpu_check.py --device cpu --quick     # smoke test: tiny sizes, well under a minute on 2 cores
    bash benchmarks/gpu_check.sh                            # the same as the first, output also in logs/gpu_check.txt

Data: Omniglot from ``--data-dir`` or $LIT_META_DATA/omniglot (default ../shared/data/omniglot); without it the
throughput runs on random images of the same shapes (said in the table) and the memory section fails.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import meta_throughput as mt  # noqa: E402
from common import machine_line, median_ms  # noqa: E402

from lit_meta.allocator import keep_freed_memory  # noqa: E402
from lit_meta.episode import Episode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
Rows = list[tuple[str, str]]  # (what, result) of one section


class Budget:
    """The time left of ``--budget-s``; a section starts only if its estimate fits."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def fits(self, estimate: float) -> bool:
        return self.left() >= estimate


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- kernels and the folded path

class Generic(nn.Module):
    """The same net seen as an arbitrary module (no ``forward_tasks``): lit_meta.functional's ``vmap`` path."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def rel(a: dict | torch.Tensor, b: dict | torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| over all tensors (dicts by key of ``b``)."""
    if isinstance(b, dict):
        a, b = torch.cat([a[k].reshape(-1) for k in b]), torch.cat([b[k].reshape(-1) for k in b])
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def folded_vs_vmap(device: torch.device, pool: str, norm: str, dtype: torch.dtype, n_tasks: int = 3,
                   hidden: int = 4) -> dict[str, float]:
    """Relative errors of the folded path against the vmap path (as tests/test_functional.py's
    test_conv4_all_tasks_forward_equals_the_generic_vmap_path, on ``device`` and in ``dtype``)."""
    from lit_meta import Conv4
    from lit_meta.backends import task_backend
    from lit_meta.functional import (expand_to_tasks, implicit_meta_grad, inner_solve, loss_for, maml_meta_grads,
                                     params_of)

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = Conv4(out_features=3, hidden=hidden, pool=pool, norm=norm).to(device, dtype)
    with torch.no_grad():  # norm scales of both signs (the max-pool blocks' rewrite flips channels with gamma < 0)
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.copy_(torch.linspace(1.5, -1.2, hidden))
    generic = Generic(net)
    put = lambda t: t.to(device, dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    sx, qx = put(torch.rand(n_tasks, 4, 1, 14, 14, generator=g)), put(torch.rand(n_tasks, 5, 1, 14, 14, generator=g))
    sy, qy = put(torch.randint(0, 3, (n_tasks, 4), generator=g)), put(torch.randint(0, 3, (n_tasks, 5), generator=g))
    theta = params_of(net)
    phi = {k: v + 0.1 * put(torch.randn(v.shape, generator=g)) for k, v in expand_to_tasks(theta, n_tasks).items()}
    v = {k: put(torch.randn(p.shape, generator=g)) for k, p in phi.items()}
    wrap = lambda d: {f"net.{k}": t for k, t in d.items()}  # noqa: E731
    unwrap = lambda d: {k[len("net."):]: t for k, t in d.items()}  # noqa: E731
    out = {"logits": rel(task_backend(net).outputs(phi, qx), task_backend(generic).outputs(wrap(phi), qx))}
    fast, slow = (task_backend(net).grads_and_outputs(loss_for(qy), phi, qx, qy),
                  task_backend(generic).grads_and_outputs(loss_for(qy), wrap(phi), qx, qy))
    out["task grads"] = rel(fast[0], unwrap(slow[0]))
    out["HVP"] = rel(task_backend(net).hvp(loss_for(sy), phi, sx, sy, v), unwrap(task_backend(generic).hvp(loss_for(sy), wrap(phi), sx, sy,
                                                                        wrap(v))))

    def imaml(model, th):
        p, _ = inner_solve(task_backend(model), loss_for(sy), th, sx, sy, lam=2.0, inner_steps=3, inner_lr=0.1)
        qgrad, _, _ = task_backend(model).grads_and_outputs(loss_for(qy), p, qx, qy)
        return implicit_meta_grad(task_backend(model), loss_for(sy), p, (sx, sy), qgrad, lam=2.0, cg_steps=3, cg_tol=0.0).x

    out["iMAML meta-grad"] = rel(imaml(net, theta), unwrap(imaml(generic, params_of(generic))))
    maml = lambda model, th: maml_meta_grads(task_backend(model), loss_for(sy), th, (sx, sy), (qx, qy), 2, 0.3)[0]  # noqa: E731
    out["MAML meta-grad"] = rel(maml(net, theta), unwrap(maml(generic, params_of(generic))))
    return out


def forward_over_reverse(device: torch.device) -> float:
    """jvp of grad through forward_tasks (the Functions' forward-mode rules) against hvp's double backward."""
    from torch.func import grad, jvp

    from lit_meta import Conv4
    from lit_meta.backends import task_backend
    from lit_meta.functional import expand_to_tasks, params_of

    torch.manual_seed(0)
    net = Conv4(out_features=3, hidden=4, pool="max").to(device, torch.float64)
    phi = {k: t + 0.1 * torch.randn_like(t) for k, t in expand_to_tasks(params_of(net), 2).items()}
    v = {k: torch.randn_like(p) for k, p in phi.items()}
    sx = torch.rand(2, 4, 1, 14, 14, device=device, dtype=torch.float64)
    sy = torch.randint(0, 3, (2, 4), device=device)
    def summed(p):
        return F.cross_entropy(net.forward_tasks(p, sx).flatten(0, 1), sy.flatten(), reduction="sum")

    forward_mode = jvp(grad(summed), (phi,), (v,))[1]
    reverse = task_backend(net).hvp(F.cross_entropy, phi, sx, sy, v)
    return rel(forward_mode, {k: 4 * t for k, t in reverse.items()})


def function_checks(device: torch.device) -> dict[str, Callable[[], bool]]:
    """gradcheck / gradgradcheck of each custom autograd Function of lit_meta.kernels on ``device`` (float64)."""
    from lit_meta.kernels import _ChannelStats, _GroupedConv, _GroupedConvBackward, _MaxPool2x2, _PooledStats
    from lit_meta.kernels import batch_norm as _batch_norm

    gc, ggc = torch.autograd.gradcheck, torch.autograd.gradgradcheck
    kw = dict(device=device, dtype=torch.float64)

    def grouped_conv(stride: int, size: int) -> bool:
        torch.manual_seed(0)
        x = torch.randn(2, 4, size, size, **kw, requires_grad=True)
        w, b = torch.randn(4, 2, 3, 3, **kw, requires_grad=True), torch.randn(4, **kw, requires_grad=True)
        conv = lambda x, w, b: _GroupedConv.apply(x, w, b, (stride, stride), (1, 1), 2)  # noqa: E731
        g = torch.randn_like(conv(x, w, b)).requires_grad_()
        backward = lambda g, x, w: _GroupedConvBackward.apply(g, x, w, (stride, stride), (1, 1), 2,  # noqa: E731
                                                              (True, True, True))
        return (torch.allclose(conv(x, w, b), F.conv2d(x, w, b, stride=stride, padding=1, groups=2), atol=1e-12)
                and gc(conv, (x, w, b), check_forward_ad=True) and ggc(conv, (x, w, b), check_fwd_over_rev=True)
                and gc(backward, (g, x, w), check_forward_ad=True) and ggc(backward, (g, x, w)))

    def channel_stats() -> bool:
        x = (torch.randn(3, 4, 5, 5, **kw) * 2 + 1).requires_grad_()
        mean, var = _ChannelStats.apply(x)
        ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        return (torch.allclose(mean, ref_mean, atol=1e-12) and torch.allclose(var, ref_var, atol=1e-12)
                and gc(_ChannelStats.apply, (x,), check_forward_ad=True) and ggc(_ChannelStats.apply, (x,)))

    def max_pool() -> bool:
        x = torch.randint(-2, 3, (3, 4, 7, 5), device=device).double()  # ties
        out, index = _MaxPool2x2.apply(x)
        ref_out, ref_index = F.max_pool2d(x, 2, ceil_mode=True, return_indices=True)
        xs = torch.randn(2, 3, 7, 5, **kw, requires_grad=True)
        pool = lambda t: _MaxPool2x2.apply(t)[0]  # noqa: E731
        return (torch.equal(out, ref_out) and torch.equal(index, ref_index)
                and gc(pool, (xs,), check_forward_ad=True) and ggc(pool, (xs,), check_fwd_over_rev=True))

    def pooled_stats() -> bool:
        xs = (torch.randn(2, 3, 6, 6, **kw) + 2).requires_grad_()
        outputs = lambda t: tuple(o for i, o in enumerate(_PooledStats.apply(t)) if i != 1)  # noqa: E731
        return gc(outputs, (xs,), check_forward_ad=True) and ggc(outputs, (xs,), check_fwd_over_rev=True)

    def batch_norm() -> bool:
        x = (torch.randn(3, 4, 5, 5, **kw) * 2 + 3).requires_grad_()
        gamma = torch.tensor([1.5, -0.7, 0.3, -1.2], **kw, requires_grad=True)
        beta = torch.randn(4, **kw, requires_grad=True)
        bn = lambda x, gamma, beta: _batch_norm(x, gamma, beta, 1e-5)  # noqa: E731
        g = torch.randn(3, 4, 5, 5, **kw)
        third = lambda x, gamma: torch.autograd.grad(bn(x, gamma, beta), (x, gamma), g, create_graph=True)  # noqa: E731
        return (torch.allclose(bn(x, gamma, beta), F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5),
                               atol=1e-12)
                and gc(bn, (x, gamma, beta), check_forward_ad=True)
                and ggc(bn, (x, gamma, beta), check_fwd_over_rev=True) and ggc(third, (x, gamma)))

    return {"grouped conv + its backward, stride 1": lambda: grouped_conv(1, 4),
            "grouped conv + its backward, stride 2": lambda: grouped_conv(2, 5),
            "channel statistics": channel_stats, "2x2 max-pool (ties, odd sizes)": max_pool,
            "fused max-pool + statistics": pooled_stats, "BatchNorm to 3rd order": batch_norm}


def section_kernels(device: torch.device, args: argparse.Namespace) -> Rows:
    rows: Rows = []
    worst = 0.0
    for pool, norm in (("stride", "batch"), ("max", "batch"), ("max", "group"), ("stride", "none"), ("max", "none")):
        errors = folded_vs_vmap(device, pool, norm, torch.float64)
        worst = max(worst, *errors.values())
        bad = {k: f"{e:.1e}" for k, e in errors.items() if not e < 1e-9}
        rows.append((f"folded vs vmap, float64, pool={pool} norm={norm}",
                     f"FAIL {bad}" if bad else f"ok (max rel err {max(errors.values()):.1e} over "
                                                f"{', '.join(errors)})"))
    e = forward_over_reverse(device)
    rows.append(("forward-over-reverse HVP vs double backward, float64", f"{'ok' if e < 1e-8 else 'FAIL'} ({e:.1e})"))
    for name, check in function_checks(device).items():
        try:
            rows.append((f"gradcheck {name}", "ok" if check() else "FAIL"))
        except Exception as e:  # gradcheck raises on a mismatch
            rows.append((f"gradcheck {name}", f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:90]}"))
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    for pool in ("stride", "max"):
        errors = folded_vs_vmap(device, pool, "batch", torch.float32, hidden=16)
        rows.append((f"folded vs vmap, float32{' (TF32 convs)' if tf32 else ''}, pool={pool}",
                     f"iMAML meta-grad rel err {errors['iMAML meta-grad']:.1e}, MAML {errors['MAML meta-grad']:.1e}, "
                     f"logits {errors['logits']:.1e}"))
    rows.append(("bf16 autocast forward_tasks vs float32", bf16_forward(device)))
    return rows


def bf16_forward(device: torch.device) -> str:
    from lit_meta import Conv4
    from lit_meta.functional import expand_to_tasks, params_of

    torch.manual_seed(0)
    net = Conv4(out_features=5, hidden=16, pool="max").to(device)
    phi = expand_to_tasks(params_of(net), 4)
    x = torch.rand(4, 5, 1, 28, 28, device=device)
    ref = net.forward_tasks(phi, x)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        low = net.forward_tasks(phi, x)
    return f"{low.dtype}, rel err {rel(low.float(), ref):.1e}, finite {bool(low.isfinite().all())}"


# --------------------------------------------------------------------------- planner

def section_planner(device: torch.device, args: argparse.Namespace) -> Rows:
    import planning

    from lit_meta.rl.planners import cem, mppi, random_shooting, shift_plan

    n, horizon = (100, 5) if args.quick else (500, 10)
    model = planning.paper_model(hidden=32 if args.quick else planning.HIDDEN).to(device)
    dynamics = planning.make_dynamics(model)
    obs = torch.randn(1, planning.OBS_DIM, generator=torch.Generator().manual_seed(1)).to(device)
    low, high = -torch.ones(planning.ACT_DIM, device=device), torch.ones(planning.ACT_DIM, device=device)
    g = torch.Generator(device).manual_seed(0)
    common = dict(horizon=horizon, n_candidates=n, action_low=low, action_high=high, generator=g)
    warm: dict[str, torch.Tensor | None] = {}

    def warm_started(name, planner, **kw):
        def call():
            res = planner(dynamics, planning.reward_fn, obs, init_mean=warm.get(name), **common, **kw)
            warm[name] = shift_plan(res.plan, low, high)
            return res
        return call

    calls = {
        "random shooting": lambda: random_shooting(dynamics, planning.reward_fn, obs, **common),
        "random shooting, bf16 matmuls": lambda: random_shooting(dynamics, planning.reward_fn, obs,
                                                                 matmul_dtype=torch.bfloat16, **common),
        f"CEM, {planning.ITERATIONS} iterations": warm_started("cem", cem, iterations=planning.ITERATIONS,
                                                               n_elites=max(2, n // 10)),
        f"MPPI, {planning.ITERATIONS} iterations": warm_started("mppi", mppi, iterations=planning.ITERATIONS,
                                                                temperature=1.0),
    }
    rows: Rows = []
    for name, fn in calls.items():
        def timed():
            res = fn()
            sync(device)
            return res
        res = fn()
        assert res.action.device.type == device.type and bool(res.action.isfinite().all()), name
        rows.append((f"{name}: {n} candidates x horizon {horizon}",
                     f"{median_ms(timed, args.repeats):.2f} ms/step (median of {args.repeats})"))
    return rows


# --------------------------------------------------------------------------- memory vs inner steps

def section_memory(device: torch.device, args: argparse.Namespace) -> Rows:
    import memory_vs_inner_steps as mem

    if device.type != "cuda" and args.quick:
        return [("peak memory vs inner steps", "n/a on CPU with --quick (peak RSS needs a fresh process per cell: "
                 "python benchmarks/memory_vs_inner_steps.py)")]
    require_omniglot(args)
    steps = {"imaml": [2, 3], "maml": [2]} if args.quick else {"imaml": [5, 10, 25, 50, 100], "maml": [5, 10, 25, 50]}
    rows: Rows = []
    for method, counts in steps.items():
        peaks = []
        for s in counts:
            if device.type == "cuda":  # in this process: cell() resets the CUDA peak statistics itself
                r = mem.cell(method, s, args.memory_meta_batch, None, "cuda")
            else:
                r = mem.run_cell(method, s, args.memory_meta_batch, None, "cpu")
            peaks.append(f"{s}: {r['peak_mib']:.0f}")
        unit = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS"
        rows.append((f"{'iMAML-GD' if method == 'imaml' else 'MAML (2nd order)'} peak MiB by inner steps "
                     f"(meta-batch {args.memory_meta_batch}, {unit})", ", ".join(peaks)))
    return rows


# --------------------------------------------------------------------------- throughput

def omniglot_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir or Path(os.environ.get("LIT_META_DATA", REPO.parent / "shared" / "data")) / "omniglot")


def require_omniglot(args: argparse.Namespace) -> None:
    path = omniglot_dir(args)
    if not (path / "images_background_small1.zip").is_file():
        raise FileNotFoundError(f"Omniglot not found at {path}: --data-dir or LIT_META_DATA")
    os.environ["LIT_META_DATA"] = str(path.parent)  # what memory_vs_inner_steps.cell reads


def synthetic_episodes(s: mt.Setting, count: int) -> list[Episode]:
    g = torch.Generator().manual_seed(0)
    support_y = torch.arange(s.n_way).repeat_interleave(s.k_shot).expand(s.meta_batch, -1)
    query_y = torch.arange(s.n_way).repeat_interleave(s.k_query).expand(s.meta_batch, -1)
    return [Episode(torch.rand(s.meta_batch, s.n_way * s.k_shot, 1, 28, 28, generator=g), support_y.clone(),
                    torch.rand(s.meta_batch, s.n_way * s.k_query, 1, 28, 28, generator=g), query_y.clone())
            for _ in range(count)]


def section_throughput(device: torch.device, args: argparse.Namespace, budget: Budget) -> Rows:
    methods = [mt.OURS, "ours MAML (2nd order)", mt.LOOP, mt.L2L]
    rows: Rows = []
    try:
        import learn2learn  # noqa: F401
    except Exception as e:
        methods.remove(mt.L2L)
        rows.append((mt.L2L, f"not installed ({type(e).__name__}; scripts/install_learn2learn.sh)"))
    settings = [mt.Setting(n_way=5, inner_steps=16),  # as meta_throughput.py --full
                mt.Setting(n_way=20, inner_steps=25, meta_batch=16, maml_task_chunk=4)]
    repeats = args.repeats_throughput
    if args.quick:
        settings = [replace(s, meta_batch=2, inner_steps=2, hidden=8) for s in settings]
    data = omniglot_dir(args)
    real = (data / "images_background_small1.zip").is_file()
    if not real:
        rows.append(("episodes", f"random images (Omniglot not found at {data})"))
    for s, estimate in zip(settings, (5, 10) if args.quick else (60, 120)):
        if not budget.fits(estimate):
            rows.append((f"{s.name}", f"skipped: budget ({budget.left():.0f} s left)"))
            continue
        try:
            with tempfile.TemporaryDirectory() as cache:
                episodes = (mt.load_episodes(data, cache, s, repeats + 1) if real
                            else synthetic_episodes(s, repeats + 1))
            episodes = [Episode(*(t.to(device) for t in ep)) for ep in episodes]
            results = mt.run_setting(s, methods, episodes, repeats)
        except (Exception, SystemExit) as e:  # the guard stops with SystemExit when ours and the loop disagree
            rows.append((f"{s.name}", f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:100]}"))
            continue
        what = f"{s.name}, meta-batch {s.meta_batch}, {s.inner_steps} steps, {s.hidden} ch"
        for variant in mt.VARIANTS:
            for m in methods:
                if (variant, m) not in results:
                    rows.append((f"{what}, {variant}: {m}", "failed (see the log above)"))
                    continue
                ratios = [f"{r:.2f}x {ref}" for ref, r in (("loop", mt.ratio(results, variant, m, mt.LOOP)),
                                                           ("l2l", mt.ratio(results, variant, m, mt.L2L)))
                          if r is not None and m not in (mt.LOOP, mt.L2L)]
                rows.append((f"{what}, {variant}: {m}",
                             f"{results[(variant, m)]:.1f} tasks/s" + (f" ({', '.join(ratios)})" if ratios else "")))
    return rows


# --------------------------------------------------------------------------- DDP

def section_ddp(device: torch.device, args: argparse.Namespace, budget: Budget) -> Rows:
    """train.py on the GPU (1 process; and 2 DDP processes where there are 2 GPUs): Lightning, the loaders and the
    learner's step on the device, as a user runs them."""
    if device.type != "cuda":
        return [("train.py on the GPU, 2-process DDP",
                 "skipped: --device cpu (CPU DDP: tests/test_ddp.py, tests/test_multinode.py)")]
    import scaling

    require_omniglot(args)
    gpus = torch.cuda.device_count()
    processes = (1, 2) if gpus >= 2 else (1,)
    fit_args = argparse.Namespace(config=scaling.CONFIG, steps=8 if args.quick else 40, warmup=2 if args.quick else 4,
                                  timeout=max(30.0, budget.left() / len(processes)), out=None)
    rows: Rows = []
    with tempfile.TemporaryDirectory() as out:
        runs = {p: scaling.fit_child(fit_args, ("gpu", p, 8), 0, Path(out)) for p in processes}
    for p, run in runs.items():
        rows.append((f"train.py, quick Omniglot config, meta-batch 8, {p} GPU process{'es (DDP)' if p > 1 else ''}",
                     f"{run.tasks_per_s:.1f} tasks/s ({run.step_ms:.0f} ms/step, wall {run.wall_s:.0f} s)"
                     + (f", {run.tasks_per_s / runs[1].tasks_per_s:.2f}x 1 GPU" if p > 1 else "")))
    if gpus < 2:
        rows.append(("2-process DDP", f"skipped: {gpus} GPU"))
    return rows


# --------------------------------------------------------------------------- the CUDA-only tests

def cuda_only_tests() -> list[str]:
    """``file::test`` of every test under a ``skipif`` that mentions CUDA (the decorators above its ``def``)."""
    found = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        decorators: list[str] = []
        for line in path.read_text().splitlines():
            if line.startswith("@"):
                decorators.append(line)
            elif line.startswith("def test_"):
                if any("skip" in d and "cuda" in d.lower() for d in decorators):
                    name = re.match(r"def (test_\w+)", line).group(1)
                    found.append(f"tests/{path.name}::{name}")
                decorators = []
            elif line.strip() and not line.startswith((" ", ")")):
                decorators = []
    return found


def section_tests(device: torch.device, args: argparse.Namespace, budget: Budget) -> Rows:
    tests = cuda_only_tests()
    rows: Rows = [("tests that skip without CUDA", ", ".join(tests) or "none found")]
    if not args.pytest:
        return rows + [("pytest of those", "not run (--pytest runs them)")]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests], cwd=REPO,
                         capture_output=True, text=True, timeout=max(30.0, budget.left()))
    summary = [line for line in run.stdout.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    rows.append(("pytest of those" + ("" if device.type == "cuda" else " (no CUDA here: they skip)"),
                 f"exit {run.returncode}: {summary[-1].strip('= ') if summary else run.stdout[-200:]}"))
    return rows


# --------------------------------------------------------------------------- main

def print_table(results: list[tuple[str, str, str, float]]) -> None:
    width = max(len(what) for _, what, _, _ in results)
    print(f"\n{'section':<10} | {'check':<{width}} | result")
    print("-" * (10 + width + 60))
    for section, what, result, _ in results:
        print(f"{section:<10} | {what:<{width}} | {result}")
    seconds = {}
    for section, _, _, s in results:
        seconds[section] = s
    print("seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda[:N] or cpu (default: cuda where available)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, 1 timed repeat")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="total seconds: a section that would start past them is skipped (default 450)")
    parser.add_argument("--pytest", action="store_true", help="also run the tests that skip without CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="timed planner calls (default 20; quick 2)")
    parser.add_argument("--repeats-throughput", type=int, default=None,
                        help="timed meta-updates per method (default 3; quick 1)")
    parser.add_argument("--memory-meta-batch", type=int, default=8, help="meta-batch of the memory cells (8)")
    parser.add_argument("--data-dir", default=None, help="folder with the Omniglot zips")
    parser.add_argument("--sections", default="kernels,planner,memory,throughput,ddp,tests",
                        help="comma-separated subset, in this order")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (torch {torch.__version__})")
    args.repeats = args.repeats or (2 if args.quick else 20)
    args.repeats_throughput = args.repeats_throughput or (1 if args.quick else 3)
    budget = Budget(args.budget_s)
    print(machine_line(malloc_kept=keep_freed_memory()))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} GPU(s), "
              f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
              f"TF32 convs {torch.backends.cudnn.allow_tf32}, TF32 matmuls {torch.backends.cuda.matmul.allow_tf32}")
    else:
        print("device: cpu")
    if args.quick:
        print("--quick: tiny sizes for a smoke test; the figures mean nothing")
    sections: dict[str, tuple[Callable[[], Rows], float]] = {  # (run, seconds it needs at least)
        "kernels": (lambda: section_kernels(device, args), 5),
        "planner": (lambda: section_planner(device, args), 5),
        "memory": (lambda: section_memory(device, args), 5 if args.quick else 40),
        "throughput": (lambda: section_throughput(device, args, budget), 5 if args.quick else 60),
        "ddp": (lambda: section_ddp(device, args, budget), 30 if device.type == "cuda" else 0),
        "tests": (lambda: section_tests(device, args, budget), 0),
    }
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(chosen) - set(sections)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {list(sections)}")
    results: list[tuple[str, str, str, float]] = []
    for name in (s for s in sections if s in chosen):
        run, estimate = sections[name]
        start = time.monotonic()
        if not budget.fits(estimate):
            results.append((name, "(section)", f"skipped: budget ({budget.left():.0f} s of {args.budget_s:.0f} left)",
                            0.0))
            continue
        print(f"\n== {name} ({budget.left():.0f} s of the budget left)", flush=True)
        try:
            rows = run()
        except (Exception, SystemExit) as e:  # one failing section: its error in the table, the others still run
            traceback.print_exc()
            rows = [("(section)", f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")]
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        elapsed = time.monotonic() - start
        results += [(name, what, result, elapsed) for what, result in rows]
    print_table(results)
    print(f"total {time.monotonic() - budget.start:.0f} s (budget {args.budget_s:.0f} s)")


if __name__ == "__main__":
    main()
