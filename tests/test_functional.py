"""The functional core against truth: closed-form proximal solutions, a dense implicit solve,
finite differences of the exact proximal solution, per-task loops, and a manual MAML unroll."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.func import functional_call

from lit_meta import MLP, Conv4
from lit_meta.backends import FoldedBackend, VmapBackend, task_backend
from lit_meta.functional import cg, expand_to_tasks, implicit_meta_grad, inner_solve, loss_for, maml_meta_grads, params_of




@pytest.fixture(autouse=True, scope="module")  # truth tests: exact up to double rounding
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def linear_tasks(n_tasks=3, n=8, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tasks, n, d, generator=g)
    y = torch.randn(n_tasks, n, 1, generator=g)
    net = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.randn(1, d, generator=g))
    return net, x, y


def proximal_closed_form(x, y, theta, lam):
    """argmin_w mean((x w - y)^2) + lam/2 |w - theta|^2  =  (2/n x^T x + lam I)^-1 (2/n x^T y + lam theta)."""
    n, d = x.shape[-2:]
    a = 2 / n * x.transpose(-1, -2) @ x + lam * torch.eye(d)
    b = 2 / n * x.transpose(-1, -2) @ y + lam * theta.view(1, d, 1)
    return torch.linalg.solve(a, b)[..., 0]  # [T, d]


@pytest.mark.parametrize("solver, steps, lr", [("gd", 400, 0.1), ("adam", 1500, 0.02), ("hessian_free", 1, None)])
def test_inner_solve_reaches_the_closed_form_proximal_solution(solver, steps, lr):
    net, x, y = linear_tasks()
    lam = 2.0
    phi, curve = inner_solve(task_backend(net), loss_for(y), params_of(net), x, y, lam=lam, inner_steps=steps,
                             inner_lr=lr or 1.0, solver=solver, cg_steps=10)
    expected = proximal_closed_form(x, y, net.weight.detach()[0], lam)
    atol = 1e-4 if solver == "adam" else 1e-8
    assert torch.allclose(phi["weight"][:, 0], expected, atol=atol)
    assert curve.shape == (steps + 1, 3) and (curve[-1] <= curve[0]).all()


def test_cg_solves_spd_systems_per_task():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(4, 6, 6, generator=g)
    a = m @ m.transpose(1, 2) + 0.5 * torch.eye(6)
    b = {"v": torch.randn(4, 6, generator=g)}
    out = cg(lambda v: {"v": (a @ v["v"][..., None])[..., 0]}, b, steps=6, tol=0.0)
    assert torch.allclose(out.x["v"], torch.linalg.solve(a, b["v"]), atol=1e-8)
    assert (out.residual < 1e-8).all() and out.iterations == 6


def test_hvp_matches_the_dense_hessian():
    torch.manual_seed(0)
    net = MLP(2, 3, hidden=(5,))
    x, y = torch.randn(2, 7, 2), torch.randint(0, 3, (2, 7))
    phi = expand_to_tasks(params_of(net), 2)
    v = {k: torch.randn_like(p) for k, p in phi.items()}
    hv = task_backend(net).hvp(loss_for(y), phi, x, y, v)
    for i in range(2):
        dense = dense_hessian(net, {k: p[i] for k, p in phi.items()}, x[i], y[i])
        vec = torch.cat([v[k][i].flatten() for k in v])
        assert torch.allclose(torch.cat([hv[k][i].flatten() for k in hv]), dense @ vec, atol=1e-10)


def dense_hessian(net, params, x, y):
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat = torch.cat([params[k].flatten() for k in names])

    def loss(f):
        parts = dict(zip(names, (p.view(s) for p, s in zip(torch.split(f, sizes), shapes))))
        return loss_for(y)(functional_call(net, parts, (x,)), y)

    return torch.func.hessian(loss)(flat)


@pytest.mark.parametrize("lam", [0.5, 2.0, 10.0])
def test_cg_meta_gradient_matches_the_dense_implicit_solve(lam):
    torch.manual_seed(0)
    net = MLP(2, 3, hidden=(6,))
    sx, sy = torch.randn(2, 9, 2), torch.randint(0, 3, (2, 9))
    qx, qy = torch.randn(2, 9, 2), torch.randint(0, 3, (2, 9))
    phi, _ = inner_solve(task_backend(net), loss_for(sy), params_of(net), sx, sy, lam=lam, inner_steps=20, inner_lr=0.1)
    qgrad, _, _ = task_backend(net).grads_and_outputs(loss_for(qy), phi, qx, qy)
    n_params = sum(p.numel() for p in net.parameters())
    solved = implicit_meta_grad(task_backend(net), loss_for(sy), phi, (sx, sy), qgrad, lam=lam, cg_steps=n_params, cg_tol=1e-12)
    for i in range(2):
        h = dense_hessian(net, {k: p[i] for k, p in phi.items()}, sx[i], sy[i])
        b = torch.cat([qgrad[k][i].flatten() for k in qgrad])
        exact = torch.linalg.solve(torch.eye(n_params) + h / lam, b)
        got = torch.cat([solved.x[k][i].flatten() for k in solved.x])
        assert torch.nn.functional.cosine_similarity(got, exact, dim=0) >= 0.9999
        assert torch.allclose(got, exact, atol=1e-6)


def test_implicit_gradient_equals_finite_differences_of_the_exact_proximal_solution():
    net, x, y = linear_tasks(n_tasks=1, n=10, d=3, seed=3)
    qx, qy = linear_tasks(n_tasks=1, n=10, d=3, seed=4)[1:]
    lam = 1.5
    theta = net.weight.detach()[0]

    def query_loss_at_solution(t):
        w = proximal_closed_form(x, y, t, lam)[0]
        return ((qx[0] @ w[:, None] - qy[0]) ** 2).mean()

    eps = 1e-6
    fd = torch.stack([(query_loss_at_solution(theta + eps * e) - query_loss_at_solution(theta - eps * e)) / (2 * eps)
                      for e in torch.eye(3)])
    phi = {"weight": proximal_closed_form(x, y, theta, lam).view(1, 1, 3)}
    qgrad, _, _ = task_backend(net).grads_and_outputs(loss_for(qy), phi, qx, qy)
    solved = implicit_meta_grad(task_backend(net), loss_for(y), phi, (x, y), qgrad, lam=lam, cg_steps=3, cg_tol=0.0)
    assert torch.allclose(solved.x["weight"][0, 0], fd, atol=1e-7)


def test_batched_meta_gradient_equals_a_per_task_loop():
    torch.manual_seed(0)
    net = Conv4(out_features=3, hidden=6)
    sx, sy = torch.rand(4, 6, 1, 28, 28), torch.randint(0, 3, (4, 6))
    qx, qy = torch.rand(4, 9, 1, 28, 28), torch.randint(0, 3, (4, 9))

    def meta_grad(s_x, s_y, q_x, q_y):
        phi, _ = inner_solve(task_backend(net), loss_for(s_y), params_of(net), s_x, s_y, lam=2.0, inner_steps=3, inner_lr=0.1)
        qgrad, _, _ = task_backend(net).grads_and_outputs(loss_for(q_y), phi, q_x, q_y)
        return implicit_meta_grad(task_backend(net), loss_for(s_y), phi, (s_x, s_y), qgrad, lam=2.0, cg_steps=4, cg_tol=0.0).x

    batched = meta_grad(sx, sy, qx, qy)
    for i in range(4):
        single = meta_grad(sx[i:i + 1], sy[i:i + 1], qx[i:i + 1], qy[i:i + 1])
        for k in batched:
            assert torch.allclose(batched[k][i], single[k][0], rtol=1e-5, atol=1e-10), k


def conv_episode(n_tasks: int, hidden: int, pool: str = "stride"):
    """A seeded 3-way Conv4 and random support/query sets of 6 images per task."""
    torch.manual_seed(0)
    net = Conv4(out_features=3, hidden=hidden, pool=pool)
    support = torch.rand(n_tasks, 6, 1, 28, 28), torch.randint(0, 3, (n_tasks, 6))
    query = torch.rand(n_tasks, 6, 1, 28, 28), torch.randint(0, 3, (n_tasks, 6))
    return net, support, query


def manual_maml_grad(net, theta, sx, sy, qx, qy, steps, lr):
    """Reference: MAML with torch.autograd and create_graph, one task at a time."""
    total = 0
    for i in range(sx.shape[0]):
        phi = dict(theta)
        for _ in range(steps):
            loss = loss_for(sy)(functional_call(net, phi, (sx[i],)), sy[i])
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {k: p - lr * g for (k, p), g in zip(phi.items(), grads)}
        total = total + loss_for(qy)(functional_call(net, phi, (qx[i],)), qy[i])
    return dict(zip(theta, torch.autograd.grad(total, list(theta.values()))))


@pytest.mark.parametrize("pool", ["stride", "max"])
def test_maml_second_order_gradient_equals_a_manual_unroll(pool):
    """Conv4's all-tasks unroll (forward_tasks, our kernels) against a per-task unroll of the plain nn.Module."""
    net, (sx, sy), (qx, qy) = conv_episode(n_tasks=3, hidden=6, pool=pool)
    theta = params_of(net)
    grads, _, _ = maml_meta_grads(task_backend(net), loss_for(sy), theta, (sx, sy), (qx, qy), 2, 0.3)
    reference = manual_maml_grad(net, theta, sx, sy, qx, qy, 2, 0.3)
    for k in theta:  # sum over tasks of the per-task gradients == gradient of the summed objective
        assert torch.allclose(grads[k].sum(0), reference[k], rtol=1e-5, atol=1e-10), k


def test_maml_gradient_through_batchnorm_matches_finite_differences():
    net, (sx, sy), (qx, qy) = conv_episode(n_tasks=1, hidden=4)
    theta = params_of(net)
    grads, losses, _ = maml_meta_grads(task_backend(net), loss_for(sy), theta, (sx, sy), (qx, qy), 2, 0.3)

    def objective(delta):
        shifted = {k: v.detach() + (delta if k == "head.weight" else 0) for k, v in theta.items()}
        return maml_meta_grads(task_backend(net), loss_for(sy), shifted, (sx, sy), (qx, qy), 2, 0.3)[1][0]

    eps = 1e-6
    for idx in [(0, 0), (1, 3), (2, 1)]:
        e = torch.zeros_like(theta["head.weight"])
        e[idx] = eps
        fd = (objective(e) - objective(-e)) / (2 * eps)
        assert torch.allclose(grads["head.weight"][0][idx], fd, rtol=1e-5, atol=1e-9)


def test_maml_second_order_gradient_equals_learn2learn():
    l2l = pytest.importorskip("learn2learn")
    torch.manual_seed(0)
    net = MLP(2, 3, hidden=(8,))
    sx, sy = torch.randn(2, 6, 2), torch.randint(0, 3, (2, 6))
    qx, qy = torch.randn(2, 6, 2), torch.randint(0, 3, (2, 6))
    theta = params_of(net)
    grads, _, _ = maml_meta_grads(task_backend(net), loss_for(sy), theta, (sx, sy), (qx, qy), 3, 0.5)
    ours = [g.sum(0) for g in grads.values()]
    maml = l2l.algorithms.MAML(net, lr=0.5, first_order=False)
    for p in net.parameters():
        p.grad = None
    for i in range(2):
        learner = maml.clone()
        for _ in range(3):
            learner.adapt(loss_for(sy)(learner(sx[i]), sy[i]))
        loss_for(qy)(learner(qx[i]), qy[i]).backward()
    for mine, p in zip(ours, net.parameters()):
        assert torch.allclose(mine, p.grad, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("pool, norm", [("stride", "batch"), ("max", "batch"), ("max", "group"), ("stride", "none"),
                                        ("max", "none")])
def test_conv4_folded_backend_equals_the_vmap_backend(pool, norm):
    """The same Conv4 through both backends: its own all-tasks forward (FoldedBackend, our kernels, plain autograd)
    against functional_call under vmap (VmapBackend), outputs, gradients, HVPs, MAML and a whole iMAML step."""
    torch.manual_seed(0)
    net = Conv4(out_features=3, hidden=4, pool=pool, norm=norm)
    with torch.no_grad():  # norm scales of both signs: the max-pool blocks' rewrite flips the channels with gamma < 0
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.copy_(torch.tensor([1.5, -0.7, 0.3, -1.2]))
    folded, vmapped = task_backend(net), VmapBackend(net)
    assert isinstance(folded, FoldedBackend) and isinstance(task_backend(net, "vmap"), VmapBackend)
    sx, sy = torch.rand(3, 4, 1, 14, 14), torch.randint(0, 3, (3, 4))
    qx, qy = torch.rand(3, 5, 1, 14, 14), torch.randint(0, 3, (3, 5))
    theta = params_of(net)
    phi = {k: v + 0.1 * torch.randn_like(v) for k, v in expand_to_tasks(theta, 3).items()}
    v = {k: torch.randn_like(p) for k, p in phi.items()}

    def close(a, b):
        for k in b:
            assert torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-12), k

    assert torch.allclose(folded.outputs(phi, qx), vmapped.outputs(phi, qx), atol=1e-12)
    fast, slow = folded.grads_and_outputs(loss_for(qy), phi, qx, qy), vmapped.grads_and_outputs(loss_for(qy), phi, qx, qy)
    close(fast[0], slow[0])
    assert torch.allclose(fast[1], slow[1]) and torch.allclose(fast[2], slow[2])
    assert torch.allclose(folded.losses(loss_for(qy), phi, qx, qy), slow[1])
    close(folded.hvp(loss_for(sy), phi, sx, sy, v), vmapped.hvp(loss_for(sy), phi, sx, sy, v))
    if norm != "batch":  # MAML through BatchNorm under vmap: tested against finite differences above, in float64
        close(maml_meta_grads(folded, loss_for(sy), theta, (sx, sy), (qx, qy), 2, 0.3)[0],
              maml_meta_grads(vmapped, loss_for(sy), theta, (sx, sy), (qx, qy), 2, 0.3)[0])

    def meta_grad(backend):  # inner solve -> query gradient -> CG, as IMAML.task_meta_grads
        p, curve = inner_solve(backend, loss_for(sy), theta, sx, sy, lam=2.0, inner_steps=3, inner_lr=0.1)
        qgrad, _, _ = backend.grads_and_outputs(loss_for(qy), p, qx, qy)
        return implicit_meta_grad(backend, loss_for(sy), p, (sx, sy), qgrad, lam=2.0, cg_steps=3, cg_tol=0.0).x, curve

    (g_fast, c_fast), (g_slow, c_slow) = meta_grad(folded), meta_grad(vmapped)
    close(g_fast, g_slow)
    assert torch.allclose(c_fast, c_slow)


def test_task_backend_choice_and_errors():
    """The backend is chosen once, by an explicit interface: folded for a FoldedNet, vmap otherwise; a bad choice
    is a ValueError that says what to do."""
    assert isinstance(task_backend(MLP(2, 2)), VmapBackend) and isinstance(task_backend(Conv4()), FoldedBackend)
    with pytest.raises(ValueError, match="needs a lit_meta.backends.FoldedNet.*use backend='vmap'"):
        task_backend(MLP(2, 2), "folded")
    with pytest.raises(ValueError, match="backend='jit' is not one of"):
        task_backend(MLP(2, 2), "jit")
    from lit_meta import IMAML
    assert isinstance(IMAML(Conv4(), backend="vmap").backend, VmapBackend)
    assert isinstance(IMAML(Conv4()).backend, FoldedBackend)


def test_conv4_hessian_vector_products_forward_over_reverse_equal_reverse_over_reverse():
    """``jvp`` of ``grad`` through Conv4.forward_tasks (the custom Functions' forward-mode rules) equals the
    Hessian-vector products :func:`hvp` takes by double backward, float64."""
    from torch.func import grad, jvp

    torch.manual_seed(0)
    net = Conv4(out_features=3, hidden=4, pool="max")
    phi = {k: v + 0.1 * torch.randn_like(v) for k, v in expand_to_tasks(params_of(net), 2).items()}
    v = {k: torch.randn_like(p) for k, p in phi.items()}
    sx, sy = torch.rand(2, 4, 1, 14, 14), torch.randint(0, 3, (2, 4))
    summed = lambda p: F.cross_entropy(net.forward_tasks(p, sx).flatten(0, 1), sy.flatten(), reduction="sum")  # noqa: E731
    forward_mode = jvp(grad(summed), (phi,), (v,))[1]
    reverse = task_backend(net).hvp(F.cross_entropy, phi, sx, sy, v)
    for k in phi:  # hvp differentiates the per-task mean losses: 4 examples per task
        assert torch.allclose(forward_mode[k], 4 * reverse[k], rtol=1e-8, atol=1e-11), k
