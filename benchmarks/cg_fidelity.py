"""Meta-gradient fidelity of iMAML's conjugate-gradient solve vs the exact dense solve, and the time per CG step.

For each net and ``lam``: the tasks' inner (proximal) solutions phi_i (``--inner-steps`` of GD, float64), the
query gradients b_i, the dense Hessians H_i of the support loss at phi_i (``torch.func.hessian``), the exact
implicit meta-gradients g*_i = (I + H_i/lam)^-1 b_i (``torch.linalg.solve``), and ours,
``lit_meta.functional.implicit_meta_grad`` with ``cg_steps`` = 1..20 (tolerance 0: exactly that many steps).
Reported per cell: cosine(g, g*) and relative error ||g - g*|| / ||g*||, mean (and worst) over the tasks, and per
``lam`` the smallest eigenvalue of I + H/lam: CG (and the implicit gradient itself) needs it > 0, which holds at a
local minimum of the proximal inner objective but not at an unconverged phi of a non-convex net.

Nets: a small MLP on sinusoid-like regression and a Conv-4 (``--conv-hidden`` channels, stride 2) on real
Omniglot 5-way 1-shot tasks ($LIT_META_DATA/omniglot, default ../shared/data/omniglot). Then the wall time per
CG step (one Hessian-vector product for all tasks + the vector updates), float32, Conv-4 64 channels, 5w1s,
meta-batch ``--meta-batch``: (t(cg_steps=20) - t(cg_steps=5)) / 15, median of ``--repeats``.

    python benchmarks/cg_fidelity.py            # a few minutes on 2 cores; docs/cg_fidelity.png
    python benchmarks/cg_fidelity.py --quick    # smoke
    python benchmarks/cg_fidelity.py --full     # more tasks, lam values and CG steps, Conv-4 with 4 channels
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402

from lit_meta.allocator import keep_freed_memory  # noqa: E402
from lit_meta import MLP, Conv4  # noqa: E402
from lit_meta.backends import task_backend  # noqa: E402
from lit_meta.functional import implicit_meta_grad, inner_solve, loss_for, params_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def dense_hessian(net, params: dict, x, y) -> torch.Tensor:
    """The support loss's Hessian at ``params``, row by row from double-backward autograd (reverse over reverse).

    Not ``torch.func.hessian``: its forward-over-reverse Hessian of the normalised Conv-4 comes out asymmetric
    (|H - H^T| ~ 0.3 for entries ~5, float64, torch 2.14), while double backward is symmetric to 1e-15 and
    agrees with our Hessian-vector products to 3e-16.
    """
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss = loss_for(y)(functional_call(net, leaves, (x,)), y)
    grads = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(leaves.values()), create_graph=True)])
    rows = [torch.cat([h.flatten() for h in torch.autograd.grad(grads[i], list(leaves.values()), retain_graph=True)])
            for i in range(grads.numel())]
    hessian = torch.stack(rows)
    return (hessian + hessian.T) / 2


def flat(params: dict, i: int) -> torch.Tensor:
    return torch.cat([params[k][i].flatten() for k in params])


def omniglot_tasks(n_tasks: int):
    from lit_meta.datamodules import OmniglotDataModule
    from lit_meta.episode import to_float

    root = Path(os.environ.get("LIT_META_DATA", REPO.parent / "shared" / "data"))
    data = OmniglotDataModule(data_dir=str(root / "omniglot"), n_way=5, k_shot=1, k_query=5, meta_batch_size=n_tasks)
    data.prepare_data()
    data.setup("fit")
    return to_float(data.dataset("train")[(0, 0)])


def fidelity(net, support, query, lams, steps, inner_steps: int, inner_lr: float) -> dict:
    sx, sy = support
    qx, qy = query
    n_params = sum(p.numel() for p in net.parameters())
    out = {}
    for lam in lams:
        phi, _ = inner_solve(task_backend(net), loss_for(sy), params_of(net), sx, sy, lam=lam, inner_steps=inner_steps,
                             inner_lr=inner_lr)
        phi = {k: v.detach() for k, v in phi.items()}
        qgrad, _, _ = task_backend(net).grads_and_outputs(loss_for(qy), phi, qx, qy)
        exact, eig = [], []
        for i in range(sx.shape[0]):
            a = torch.eye(n_params) + dense_hessian(net, {k: p[i] for k, p in phi.items()}, sx[i], sy[i]) / lam
            eig.append(float(torch.linalg.eigvalsh(a)[0]))
            exact.append(torch.linalg.solve(a, flat(qgrad, i)))
        out[(lam, "eig")] = min(eig)
        for k in steps:
            got = implicit_meta_grad(task_backend(net), loss_for(sy), phi, (sx, sy), qgrad, lam=lam, cg_steps=k, cg_tol=0.0).x
            cos = [float(torch.nn.functional.cosine_similarity(flat(got, i), e, dim=0)) for i, e in enumerate(exact)]
            rel = [float((flat(got, i) - e).norm() / e.norm()) for i, e in enumerate(exact)]
            out[(lam, k)] = (statistics.mean(cos), min(cos), statistics.mean(rel), max(rel))
    return out


def time_per_cg_step(meta_batch: int, repeats: int) -> float:
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    net = Conv4(out_features=5, hidden=64)
    ep = omniglot_tasks(meta_batch)
    lam = 2.0
    phi, _ = inner_solve(task_backend(net), loss_for(ep.support_y), params_of(net), ep.support_x, ep.support_y, lam=lam,
                         inner_steps=2, inner_lr=0.1)
    phi = {k: v.detach() for k, v in phi.items()}
    qgrad, _, _ = task_backend(net).grads_and_outputs(loss_for(ep.query_y), phi, ep.query_x, ep.query_y)

    def run(k: int) -> float:
        start = time.perf_counter()
        implicit_meta_grad(task_backend(net), loss_for(ep.support_y), phi, (ep.support_x, ep.support_y), qgrad, lam=lam,
                           cg_steps=k, cg_tol=0.0)
        return time.perf_counter() - start

    run(2)  # warm-up
    per_step = [(run(20) - run(5)) / 15 for _ in range(repeats)]
    return statistics.median(per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "cg_fidelity.png")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lams = [0.5, 1.0, 2.0, 10.0] if not args.full else [0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0]
    steps = [1, 2, 3, 5, 10, 20] if not args.full else list(range(1, 21))
    n_tasks, conv_hidden = (2, 2) if args.quick else ((8, 4) if args.full else (4, 2))
    if args.quick:
        lams, steps = [0.5, 2.0], [1, 5, 20]
    print(machine_line(malloc_kept=keep_freed_memory()))

    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    mlp = MLP(1, 1, hidden=(16, 16))
    g = torch.Generator().manual_seed(1)
    amp, phase = torch.rand(n_tasks, 1, 1, generator=g) * 4.9 + 0.1, torch.rand(n_tasks, 1, 1, generator=g) * 3.14
    xs = torch.rand(n_tasks, 20, 1, generator=g) * 10 - 5
    ys = amp * torch.sin(xs + phase)
    nets = {f"MLP 1-16-16-1 ({sum(p.numel() for p in mlp.parameters())} params), sinusoid 10-shot":
            (mlp, (xs[:, :10], ys[:, :10]), (xs[:, 10:], ys[:, 10:]), 0.05)}
    conv = Conv4(out_features=5, hidden=conv_hidden).double()
    ep = omniglot_tasks(n_tasks)
    ep = type(ep)(*(t.double() if t.is_floating_point() else t for t in ep))
    nets[f"Conv-4 {conv_hidden} ch ({sum(p.numel() for p in conv.parameters())} params), Omniglot 5w1s"] = (
        conv, (ep.support_x, ep.support_y), (ep.query_x, ep.query_y), 0.02)  # lr < 2 / (lam + max eig H)

    results = {}
    for name, (net, support, query, inner_lr) in nets.items():
        start = time.perf_counter()
        results[name] = fidelity(net, support, query, lams, steps, inner_steps=30 if args.quick else 300,
                                 inner_lr=inner_lr)
        print(f"\n{name}: {n_tasks} tasks, float64, exact = dense solve ({time.perf_counter() - start:.0f} s)")
        print("smallest eigenvalue of I + H/lam over the tasks (CG needs > 0): " +
              ", ".join(f"lam {lam}: {results[name][(lam, 'eig')]:.3f}" for lam in lams))
        print("cosine(g_CG, g_exact), mean over tasks (worst):")
        print(f"{'lam':>6} " + " ".join(f"{'cg ' + str(k):>17}" for k in steps))
        for lam in lams:
            print(f"{lam:>6} " + " ".join(f"{results[name][(lam, k)][0]:>8.6f} ({results[name][(lam, k)][1]:.4f})"
                                          for k in steps))
        print("relative error ||g_CG - g_exact|| / ||g_exact||, mean over tasks (worst):")
        for lam in lams:
            print(f"{lam:>6} " + " ".join(f"{results[name][(lam, k)][2]:>8.1e} ({results[name][(lam, k)][3]:.1e})"
                                          for k in steps))

    if not args.quick:
        ms = 1000 * time_per_cg_step(args.meta_batch, args.repeats)
        print(f"\nwall time per CG step, Conv-4 64 ch, Omniglot 5w1s, meta-batch {args.meta_batch}, float32: "
              f"{ms:.1f} ms ({ms / args.meta_batch:.2f} ms per task)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.2), squeeze=False)
    for ax, (name, cells) in zip(axes[0], results.items()):
        for lam in lams:
            ax.semilogy(steps, [max(cells[(lam, k)][2], 1e-16) for k in steps], marker="o", ms=3, label=f"lam {lam}")
        ax.set_xlabel("CG steps")
        ax.set_ylabel("relative error vs dense solve")
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot if not args.quick else Path("/tmp") / "cg_fidelity_quick.png", dpi=100)
    print(f"plot: {args.plot if not args.quick else '/tmp/cg_fidelity_quick.png'}")


if __name__ == "__main__":
    main()
