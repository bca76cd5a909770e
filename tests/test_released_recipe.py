"""iMAML as the authors' released code runs it (aravindr93/imaml_dev), as options of IMAML: the batched meta-gradient
against a per-task loop written like the released one, the defaults still the paper's system, non-positive
curvature in CG counted and logged, and bad option values refused."""

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from helpers import OneEpisode
from lit_meta import IMAML, MLP, Conv4, Episode
from lit_meta.backends import task_backend
from lit_meta.functional import cg, implicit_meta_grad, inner_solve, loss_for, params_of

REPO = Path(__file__).resolve().parents[1]
RELEASED = dict(inner_objective="plain_then_pullback", regu_coef=1.0, lam_damping=10.0, eval_adaptation="plain")


def fit_one_step(model, episode):
    """One meta-update through the Trainer (outer SGD with lr 1: the parameter change is minus the meta-gradient)."""
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(model, OneEpisode(episode))
    return model.trainer


def sgd(params):
    return torch.optim.SGD(params, lr=1.0)


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def released_loop_meta_grad(net, episode, *, lam, inner_steps, inner_lr, cg_steps, regu_coef, lam_damping):
    """The released training loop's meta-gradient, one task at a time, in plain torch (written from its description:
    examples/omniglot_implicit_maml.py, implicit_maml/learner_model.py, implicit_maml/utils.py)."""
    theta = [p.detach().clone() for p in net.parameters()]
    meta_grad, iterations = 0.0, []
    for i in range(episode.n_tasks):
        sx, sy, qx, qy = (t[i] for t in episode)
        fast = copy.deepcopy(net)  # the task's weights start at theta
        params = list(fast.parameters())
        opt = torch.optim.SGD(params, lr=inner_lr)
        for _ in range(inner_steps):  # plain steps on the support loss (no proximal term)
            opt.zero_grad()
            F.cross_entropy(fast(sx), sy).backward()
            opt.step()
        opt.zero_grad()  # the pull-back: one step of the same SGD on lam/2 ||phi - theta||^2
        sum(0.5 * lam * ((p - t) ** 2).sum() for p, t in zip(params, theta)).backward()
        opt.step()
        b = flat(torch.autograd.grad(F.cross_entropy(fast(qx), qy), params))

        def matvec(v):  # (1 + regu_coef) v + H v / (lam + lam_damping), H the support-loss Hessian at phi
            g = flat(torch.autograd.grad(F.cross_entropy(fast(sx), sy), params, create_graph=True))
            hv = flat(torch.autograd.grad((g * v).sum(), params))
            return (1 + regu_coef) * v + hv / (lam + lam_damping)

        x, r = torch.zeros_like(b), b.clone()  # CG from x = 0; stops early only when r^T r < 1e-10
        p, rr, n = r.clone(), r.dot(r), 0
        for n in range(1, cg_steps + 1):
            ap = matvec(p)
            alpha = rr / p.dot(ap)
            x, r = x + alpha * p, r - alpha * ap
            rr_new = r.dot(r)
            p, rr = r + rr_new / rr * p, rr_new
            if rr_new < 1e-10:
                break
        iterations.append(n)
        meta_grad = meta_grad + x / episode.n_tasks  # the mean over the meta-batch
    return meta_grad, iterations


def test_released_recipe_meta_gradient_equals_a_released_style_per_task_loop():
    torch.manual_seed(0)
    net = Conv4(out_features=5, hidden=8).double()
    g = torch.Generator().manual_seed(1)
    n_tasks = 4
    sx = torch.rand(n_tasks, 5, 1, 28, 28, generator=g, dtype=torch.float64)
    qx = torch.rand(n_tasks, 15, 1, 28, 28, generator=g, dtype=torch.float64)
    sy = torch.stack([torch.randperm(5, generator=g) for _ in range(n_tasks)])
    qy = torch.randint(0, 5, (n_tasks, 15), generator=g)
    ep = Episode(sx, sy, qx, qy)
    recipe = dict(lam=2.0, inner_steps=16, inner_lr=0.1, cg_steps=5, regu_coef=1.0, lam_damping=10.0)
    expected, iterations = released_loop_meta_grad(net, ep, **recipe)
    assert iterations == [5] * n_tasks  # no early stop: both sides run the 5 CG steps

    model = IMAML(copy.deepcopy(net), optimizer=sgd, **{**RELEASED, **recipe})
    before = flat(p.detach().clone() for p in model.parameters())
    trainer = fit_one_step(model, ep)
    got = before - flat(p.detach() for p in model.parameters())  # theta.grad of the one meta-update
    assert got.dtype == torch.float64
    max_abs = (got - expected).abs().max().item()
    rel = ((got - expected).norm() / expected.norm()).item()
    print(f"released recipe, float64: max |batched - loop| = {max_abs:.2e} (max |g| = {expected.abs().max():.2e}), "
          f"||batched - loop|| / ||loop|| = {rel:.2e}")
    assert max_abs < 1e-12 and rel < 1e-12
    assert trainer.callback_metrics["train/cg_negative_curvature"] == 0  # the damped system stays positive definite

    # the options matter: the paper's system on the same episode gives another meta-gradient
    paper = IMAML(copy.deepcopy(net), optimizer=sgd, lam=2.0, inner_steps=16, inner_lr=0.1, cg_steps=5)
    fit_one_step(paper, ep)
    paper_grad = before - flat(p.detach() for p in paper.parameters())
    assert (paper_grad - expected).norm() > 1e-2 * expected.norm()


def dense_hessian(net, params, x, y):
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def loss(f):
        parts = dict(zip(names, (p.view(s) for p, s in zip(torch.split(f, sizes), shapes))))
        return loss_for(y)(torch.func.functional_call(net, parts, (x,)), y)

    return torch.func.hessian(loss)(flat(params.values()))


def test_defaults_are_the_papers_algorithm():
    """IMAML's defaults: proximal inner solve, CG on (I + H/lam) g = grad L^test (here to convergence, against a dense
    solve), adaptation at evaluation as in training. (tests/test_functional.py checks the functional pieces.)"""
    model = IMAML(MLP(2, 3, hidden=(5,)).double(), lam=10.0, inner_steps=20, inner_lr=0.1, cg_steps=200, cg_tol=1e-14)
    assert (model.inner_objective, model.regu_coef, model.lam_damping, model.eval_adaptation) == \
        ("proximal", 0.0, 0.0, "as_training")
    g = torch.Generator().manual_seed(0)
    sx, qx = (torch.randn(2, 9, 2, generator=g, dtype=torch.float64) for _ in range(2))
    sy, qy = torch.randint(0, 3, (2, 9), generator=g), torch.randint(0, 3, (2, 9), generator=g)
    ep = Episode(sx, sy, qx, qy)
    result = model.task_meta_grads(ep)
    grads = result.grads
    theta = params_of(model.net)
    phi, _ = inner_solve(model.backend, loss_for(sy), theta, sx, sy, lam=10.0, inner_steps=20, inner_lr=0.1)
    qgrad, _, _ = model.backend.grads_and_outputs(loss_for(qy), phi, qx, qy)
    for i in range(2):
        h = dense_hessian(model.net, {k: p[i] for k, p in phi.items()}, sx[i], sy[i])
        exact = torch.linalg.solve(torch.eye(len(h), dtype=h.dtype) + h / 10.0, flat(v[i] for v in qgrad.values()))
        assert torch.allclose(flat(v[i] for v in grads.values()), exact, atol=1e-10)
    assert not result.cg_negative_curvature.any()
    adapted = model.adapt(sx, sy)
    assert all(torch.equal(adapted[k], phi[k]) for k in phi)  # evaluation adapts with the proximal inner solve


def test_eval_adaptation_plain_is_plain_gd_and_as_training_follows_the_inner_objective():
    torch.manual_seed(0)
    net = MLP(2, 3, hidden=(5,)).double()
    g = torch.Generator().manual_seed(0)
    sx, sy = torch.randn(3, 9, 2, generator=g, dtype=torch.float64), torch.randint(0, 3, (3, 9), generator=g)
    theta = params_of(net)
    plain, _ = inner_solve(task_backend(net), loss_for(sy), theta, sx, sy, lam=0.0, inner_steps=4, inner_lr=0.1)
    pulled, _ = inner_solve(task_backend(net), loss_for(sy), theta, sx, sy, lam=2.0, inner_steps=4, inner_lr=0.1,
                            objective="plain_then_pullback")
    for k in plain:  # the pull-back keeps 1 - inner_lr lam = 0.8 of the plain steps' move
        assert torch.allclose(pulled[k], theta[k] + 0.8 * (plain[k] - theta[k]), atol=1e-14)
    common = dict(lam=2.0, inner_steps=4, inner_lr=0.1, inner_objective="plain_then_pullback")
    for adaptation, expected in (("plain", plain), ("as_training", pulled)):
        got = IMAML(net, eval_adaptation=adaptation, **common).adapt(sx, sy)
        assert all(torch.allclose(got[k], expected[k], atol=1e-14) for k in expected), adaptation


class Bilinear(nn.Module):
    """f(x) = a b x: the loss (a b x - y)^2 has Hessian [[2b^2, 2(2ab - y)], [2(2ab - y), 2a^2]] (x = 1), whose
    eigenvalue near a = b = 0 is about -2y: for y = 5, about -10, below -lam for lam = 1."""

    def __init__(self, a=0.1, b=0.1):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor([a])), nn.Parameter(torch.tensor([b]))

    def forward(self, x):
        return self.a * self.b * x


def bilinear_episode(n_tasks=3):
    x, y = torch.ones(n_tasks, 4, 1), torch.full((n_tasks, 4, 1), 5.0)
    return Episode(x, y, x, y)


def test_cg_flags_non_positive_curvature_per_task():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 6, 6, generator=g))
    eig = torch.tensor([[1.0, 2, 3, 4, 5, 6], [-3.0, 2, 3, 4, 5, 6], [0.5, 1, 1, 2, 2, 3]])
    a = q @ torch.diag_embed(eig) @ q.transpose(1, 2)  # task 1 indefinite, tasks 0 and 2 positive definite
    b = {"v": torch.randn(3, 6, generator=g)}
    out = cg(lambda v: {"v": (a @ v["v"][..., None])[..., 0]}, b, steps=6, tol=0.0)
    assert out.negative_curvature.tolist() == [False, True, False]


def test_indefinite_implicit_system_is_counted_and_the_damped_one_is_not():
    net = Bilinear()
    ep = bilinear_episode(n_tasks=2)
    phi = {k: v.detach().expand(2, *v.shape).clone() for k, v in params_of(net).items()}
    qgrad, _, _ = task_backend(net).grads_and_outputs(loss_for(ep.query_y), phi, ep.query_x, ep.query_y)
    h = dense_hessian(net, {k: v[0] for k, v in phi.items()}, ep.support_x[0], ep.support_y[0])
    assert torch.linalg.eigvalsh(h).min() < -1.0  # an eigenvalue below -lam: I + H/lam is indefinite
    support = (ep.support_x, ep.support_y)
    paper = implicit_meta_grad(task_backend(net), loss_for(ep.support_y), phi, support, qgrad, lam=1.0, cg_steps=2)
    damped = implicit_meta_grad(task_backend(net), loss_for(ep.support_y), phi, support, qgrad, lam=1.0, cg_steps=2,
                                regu_coef=1.0, lam_damping=10.0)
    assert paper.negative_curvature.sum() == 2 and damped.negative_curvature.sum() == 0


@pytest.mark.parametrize("damping, fraction", [({}, 1.0), (dict(regu_coef=1.0, lam_damping=10.0), 0.0)],
                         ids=["paper", "released"])
def test_imaml_logs_cg_negative_curvature(damping, fraction, recwarn):
    model = IMAML(Bilinear(), lam=1.0, inner_steps=1, inner_lr=1e-3, cg_steps=2,
                  optimizer=lambda p: torch.optim.SGD(p, lr=1e-4), **damping)
    trainer = fit_one_step(model, bilinear_episode())
    assert trainer.callback_metrics["train/cg_negative_curvature"] == fraction
    warned = [w for w in recwarn if "non-positive curvature" in str(w.message)]
    assert len(warned) == (1 if fraction else 0)
    if warned:
        assert "3 of 3 tasks" in str(warned[0].message) and "(I + H/lam)" in str(warned[0].message)


@pytest.mark.parametrize("kwargs, message", [
    ({"inner_objective": "pullback"}, r"inner_objective='pullback' is not one of"),
    ({"inner_objective": "plain_then_pullback", "inner_solver": "adam"}, r"needs inner_solver='gd', not 'adam'"),
    ({"inner_objective": "plain_then_pullback", "inner_lr": 0.5}, r"inner_lr \* lam = 1 .*needs inner_lr \* lam < 1"),
    ({"regu_coef": -1.0}, r"regu_coef=-1.0 must be a finite number >= 0"),
    ({"lam_damping": float("nan")}, r"lam_damping=nan must be a finite number >= 0"),
    ({"lam_damping": float("inf")}, r"lam_damping=inf must be a finite number >= 0"),
    ({"regu_coef": True}, r"regu_coef=True must be a finite number >= 0"),
    ({"eval_adaptation": "proximal"}, r"eval_adaptation='proximal' is not one of \('as_training', 'plain'\)"),
])
def test_bad_recipe_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IMAML(Conv4(hidden=4), **kwargs)


def test_inner_solve_refuses_a_bad_objective():
    net = MLP(2, 3, hidden=(4,))
    x, y = torch.randn(2, 5, 2), torch.randint(0, 3, (2, 5))
    with pytest.raises(ValueError, match=r"inner_objective='prox' is not one of"):
        inner_solve(task_backend(net), loss_for(y), params_of(net), x, y, lam=1.0, inner_steps=1, inner_lr=0.1, objective="prox")
    with pytest.raises(ValueError, match=r"needs inner_solver='gd', not 'hessian_free'"):
        inner_solve(task_backend(net), loss_for(y), params_of(net), x, y, lam=1.0, inner_steps=1, inner_lr=0.1,
                    solver="hessian_free", objective="plain_then_pullback")


def test_the_imaml_omniglot_configs_run_the_released_recipe_and_the_released_config_is_the_default():
    default = yaml.safe_load((REPO / "configs" / "imaml_omniglot_5w1s.yaml").read_text())
    released = yaml.safe_load((REPO / "configs" / "imaml_omniglot_5w1s_released.yaml").read_text())
    released["trainer"]["callbacks"][0]["init_args"]["dirpath"] = "logs/imaml_omniglot_5w1s/checkpoints"
    released["trainer"]["logger"]["init_args"]["name"] = "imaml_omniglot_5w1s"
    assert released == default  # the reproduction of the authors' code is the default 5w1s config
    for name in ("5w1s", "5w5s", "20w1s", "20w5s", "5w1s_quick"):
        model = yaml.safe_load((REPO / "configs" / f"imaml_omniglot_{name}.yaml").read_text())["model"]["init_args"]
        assert {k: model[k] for k in RELEASED} == RELEASED, name  # chosen by benchmarks/accuracy_budget.py
        assert model["optimizer"]["init_args"]["eps"] == 0.001, name
