"""Pure functions over parameter dicts, batched over a leading task dimension.

No Lightning, no state: every function takes a task backend (:mod:`lit_meta.backends`, ``task_backend(net)``:
how the network runs for all tasks at once), a dict of parameters and tensors, and returns tensors. ``Params``
without a task dimension are shared by all tasks (meta-parameters theta); ``TaskParams`` carry a leading
dimension ``T``, one set per task.

iMAML (Rajeswaran et al. 2019, arXiv 1909.04630), read top to bottom:
  1. :func:`inner_solve`       phi_i = argmin_phi L_i^tr(phi) + lam/2 ||phi - theta||^2          (Eq. 4)
  2. :func:`implicit_meta_grad` solve (I + H_i/lam) g_i = grad L_i^test(phi_i) by :func:`cg`     (Eq. 6-7)
     with Hessian-vector products (the backend's ``hessian_operator``)
  3. the meta-update theta.grad = mean_i g_i is the LightningModule's (lit_meta.learners).
The authors' released code (aravindr93/imaml_dev) runs another recipe, here one option away in each step:
  1. ``inner_solve(objective="plain_then_pullback")``: K GD steps on L_i^tr alone, then one :func:`pull_back`
     step phi_i <- phi_i - inner_lr lam (phi_i - theta);
  2. ``implicit_meta_grad(regu_coef=1, lam_damping=10)``: CG on ((1 + regu_coef) I + H_i/(lam + lam_damping)) g_i
     = grad L_i^test(phi_i), a damped system that is positive definite unless H_i has an eigenvalue below
     -(1 + regu_coef)(lam + lam_damping);
  3. the same mean over tasks.
Second-order MAML's per-task meta-gradients: :func:`maml_meta_grads`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import (LossFn, Params, TaskBackend, TaskParams, broadcast_to_tasks,  # noqa: F401 (re-exported)
                       expand_to_tasks, params_of, per_task_loss)

InnerSolver = Literal["gd", "adam", "hessian_free"]
INNER_SOLVERS = ("gd", "adam", "hessian_free")
InnerObjective = Literal["proximal", "plain_then_pullback"]
INNER_OBJECTIVES = ("proximal", "plain_then_pullback")


def mse_loss(outputs: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Mean squared error written out: ``F.mse_loss`` breaks forward-over-reverse HVPs under ``torch.func``
    (torch 2.14: "ZeroTensors are immutable" in its double backward)."""
    err = (outputs - target) ** 2
    return err.mean() if reduction == "mean" else err


def loss_for(target: Tensor) -> LossFn:
    """Cross-entropy for integer class labels, mean squared error for real-valued targets."""
    return F.cross_entropy if not target.is_floating_point() else mse_loss


def _dot(a: TaskParams, b: TaskParams) -> Tensor:
    """Per-task inner product ``[T]`` of two per-task parameter dicts."""
    return sum((a[k] * b[k]).flatten(1).sum(1) for k in a)


def _axpy(alpha: Tensor | float, x: TaskParams, y: TaskParams) -> TaskParams:
    """``y + alpha * x`` with a per-task scalar ``alpha [T]`` or one float for all tasks."""
    if isinstance(alpha, float):
        return {k: y[k] + alpha * x[k] for k in x}
    return {k: y[k] + alpha.view(-1, *([1] * (x[k].dim() - 1))) * x[k] for k in x}


# --------------------------------------------------------------------------- 1. inner solve (Eq. 4)

def check_inner(solver: str, objective: str) -> None:
    """``ValueError`` for an unknown inner solver or objective, or a combination :func:`inner_solve` cannot run."""
    if solver not in INNER_SOLVERS:
        raise ValueError(f"inner_solver={solver!r} is not one of {INNER_SOLVERS}")
    if objective not in INNER_OBJECTIVES:
        raise ValueError(f"inner_objective={objective!r} is not one of {INNER_OBJECTIVES}")
    if objective == "plain_then_pullback" and solver != "gd":
        raise ValueError(f"inner_objective='plain_then_pullback' takes plain gradient steps (the released code's "
                         f"only inner algorithm): it needs inner_solver='gd', not {solver!r}")


def inner_solve(
    backend: TaskBackend,
    loss_fn: LossFn,
    theta: Params,
    x: Tensor,
    y: Tensor,
    *,
    lam: float,
    inner_steps: int,
    inner_lr: float,
    solver: InnerSolver = "gd",
    cg_steps: int = 5,
    objective: InnerObjective = "proximal",
) -> tuple[TaskParams, Tensor]:
    """Approximately solve the proximal task problem for all tasks at once (iMAML Eq. 4):

        phi_i = argmin_phi L_i(phi) + lam/2 ||phi - theta||^2,   starting from phi = theta.

    ``solver="gd"``: ``inner_steps`` steps phi <- phi - inner_lr (grad L_i(phi) + lam (phi - theta)).
    ``solver="adam"``: the same gradient through Adam (betas 0.9/0.999, eps 1e-8, step ``inner_lr``).
    ``solver="hessian_free"``: ``inner_steps`` Newton steps phi <- phi - t d with (H_i + lam I) d = grad,
    d by ``cg_steps`` of :func:`cg` (iMAML-HF), t from a per-task backtracking search (1, 1/2, ..., 1/16,
    else 0) on the proximal objective; ``inner_lr`` is unused. ``lam = 0`` is plain fine-tuning.

    ``objective="plain_then_pullback"`` (only with ``solver="gd"``) is the authors' released code instead
    (aravindr93/imaml_dev, ``examples/omniglot_implicit_maml.py``: ``learn_task`` without regularisation, then
    one step of the same SGD optimizer on ``regularization_loss``): ``inner_steps`` steps
    phi <- phi - inner_lr grad L_i(phi) on the support loss alone, then ONE :func:`pull_back` step on
    lam/2 ||phi - theta||^2 with the same ``inner_lr``. Its phi is not the minimiser of Eq. 4.

    Shapes: theta without task dim; x ``[T, B, ...]``, y ``[T, B, ...]``. Returns phi ``[T, ...]``
    (detached: nothing is differentiated through the solve) and the objective the steps descend before each
    step and at the returned phi, ``[inner_steps + 1, T]``: the proximal objective, or with
    ``"plain_then_pullback"`` the support loss L_i (its last entry after the pull-back).
    """
    check_inner(solver, objective)
    theta = {k: v.detach() for k, v in theta.items()}
    # "proximal": every step descends L_i + lam/2 ||phi - theta||^2 (Eq. 4); "plain_then_pullback": the steps
    # descend L_i alone and lam acts only in the one pull-back step after them
    step_lam = lam if objective == "proximal" else 0.0
    phi = expand_to_tasks(theta, x.shape[0])
    curve = []
    if solver == "adam":  # moment estimates, only for Adam
        m = {k: torch.zeros_like(v) for k, v in phi.items()}
        s = {k: torch.zeros_like(v) for k, v in phi.items()}
    for step in range(inner_steps):
        g, loss = backend.grads(loss_fn, phi, x, y)
        diff = _sub(phi, theta)
        curve.append(_proximal(loss.detach(), diff, step_lam))
        g = {k: g[k] + step_lam * diff[k] for k in phi}
        if solver == "gd":  # phi <- phi - inner_lr (grad L_i(phi) + lam (phi - theta))   (Eq. 4 by GD; plain: lam 0)
            phi = {k: phi[k] - inner_lr * g[k] for k in phi}
        elif solver == "adam":
            b1, b2, eps, t = 0.9, 0.999, 1e-8, step + 1
            m = {k: b1 * m[k] + (1 - b1) * g[k] for k in phi}
            s = {k: b2 * s[k] + (1 - b2) * g[k] ** 2 for k in phi}
            phi = {k: phi[k] - inner_lr * (m[k] / (1 - b1 ** t)) / ((s[k] / (1 - b2 ** t)).sqrt() + eps) for k in phi}
        else:  # hessian_free
            hessian = backend.hessian_operator(loss_fn, phi, x, y)
            newton = lambda v: _axpy(float(lam), v, hessian(v))  # (H_i + lam I) v
            d = cg(newton, g, cg_steps, tol=0.0).x
            phi = _backtrack(backend, loss_fn, theta, phi, d, x, y, lam, curve[-1])
    if objective == "plain_then_pullback":
        phi = pull_back(phi, theta, lam=lam, lr=inner_lr)
    curve.append(_proximal_objective(backend, loss_fn, theta, phi, x, y, step_lam))
    return phi, torch.stack(curve)


def pull_back(phi: TaskParams, theta: Params, *, lam: float, lr: float) -> TaskParams:
    """One SGD step of step size ``lr`` on lam/2 ||phi_i - theta||^2 for every task (the released code's
    pull-back after its plain inner steps): phi_i keeps the fraction 1 - lr lam of its move away from theta."""
    return {k: phi[k] - lr * lam * (phi[k] - theta[k]) for k in phi}  # phi_i <- phi_i - lr lam (phi_i - theta)


def _proximal_objective(backend: TaskBackend, loss_fn: LossFn, theta: Params, phi: TaskParams, x: Tensor, y: Tensor,
                        lam: float) -> Tensor:
    """Per-task L_i(phi_i) + lam/2 ||phi_i - theta||^2, ``[T]``."""
    return _proximal(backend.losses(loss_fn, phi, x, y).detach(), _sub(phi, theta), lam)


def _proximal(loss: Tensor, diff: TaskParams, lam: float) -> Tensor:
    """L_i + lam/2 ||phi_i - theta||^2 from the losses ``[T]`` and ``diff = phi - theta``."""
    return loss + lam / 2 * _dot(diff, diff)


def _backtrack(backend: TaskBackend, loss_fn: LossFn, theta: Params, phi: TaskParams, d: TaskParams, x: Tensor, y: Tensor,
               lam: float, current: Tensor, halvings: int = 4) -> TaskParams:
    """Per-task step phi - t d with t the best of 1, 1/2, ..., 2^-halvings, or no step if none lowers the
    proximal objective (a Newton step on a non-convex loss can overshoot)."""
    best_t = torch.zeros_like(current)
    best = current
    for j in range(halvings + 1):
        t = 0.5 ** j
        value = _proximal_objective(backend, loss_fn, theta, {k: phi[k] - t * d[k] for k in phi}, x, y, lam)
        better = value < best  # NaN never counts as better
        best_t, best = torch.where(better, t, best_t), torch.where(better, value, best)
    return _axpy(-best_t, d, phi)


def _sub(a: TaskParams, theta: Params) -> TaskParams:
    return {k: a[k] - theta[k] for k in a}


# --------------------------------------------------------------------------- 2. implicit meta-gradient (Eq. 6-7)

@dataclass
class CGResult:
    """Solution ``x [T, ...]``, final residual norm ``||b - A x||`` per task ``[T]``, iterations run, and per
    task ``[T]`` (bool) whether its CG met a direction of non-positive curvature (p^T A p <= 0: A is not
    positive definite, so x is not A^-1 b; the task's CG stopped there)."""

    x: TaskParams
    residual: Tensor
    iterations: int
    negative_curvature: Tensor


def cg(matvec: Callable[[TaskParams], TaskParams], b: TaskParams, steps: int, tol: float = 1e-10) -> CGResult:
    """Conjugate gradient for A x = b, every task's system at once (A symmetric positive definite).

    Starts from x = 0; stops after ``steps`` iterations or when every task's residual norm is
    ``<= tol * ||b||``. A task whose direction has non-positive curvature (p^T A p <= 0) stops there
    (truncated CG), keeping its last iterate, and is flagged in ``negative_curvature``: on an indefinite
    system CG does not pass silently.

        >>> import torch
        >>> a = torch.tensor([[[4.0, 1.0], [1.0, 3.0]], [[2.0, 0.0], [0.0, 5.0]]])   # two tasks' SPD matrices
        >>> b = {"w": torch.tensor([[1.0, 2.0], [2.0, 5.0]])}
        >>> result = cg(lambda v: {"w": (a @ v["w"][..., None])[..., 0]}, b, steps=2)
        >>> torch.allclose(result.x["w"], torch.linalg.solve(a, b["w"])), result.negative_curvature.tolist()
        (True, [False, False])
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rs = _dot(r, r)
    stop = rs.sqrt() * tol
    active = rs > stop ** 2
    negative = torch.zeros_like(active)
    it = 0
    for it in range(1, steps + 1):
        ap = matvec(p)
        pap = _dot(p, ap)
        negative = negative | (active & (pap <= 0))  # only while the task still iterates (NaN is not counted)
        active = active & (pap > 0)
        alpha = torch.where(active, rs / torch.where(active, pap, 1.0), 0.0)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rs_new = _dot(r, r)
        beta = torch.where(active, rs_new / torch.where(active, rs, 1.0), 0.0)
        p = _axpy(beta, p, r)
        rs = torch.where(active, rs_new, rs)
        active = active & (rs_new > stop ** 2)
        if tol > 0 and not bool(active.any()):
            break
    return CGResult(x, rs.sqrt(), it, negative)


def implicit_meta_grad(
    backend: TaskBackend,
    loss_fn: LossFn,
    phi: TaskParams,
    support: tuple[Tensor, Tensor],
    query_grad: TaskParams,
    *,
    lam: float,
    cg_steps: int,
    cg_tol: float = 1e-10,
    regu_coef: float = 0.0,
    lam_damping: float = 0.0,
) -> CGResult:
    """The implicit meta-gradient of every task (iMAML Eq. 6-7):

        g_i = (I + H_i / lam)^{-1} grad L_i^test(phi_i),   H_i = Hessian of L_i^train at phi_i,

    by :func:`cg` with the backend's Hessian-vector products on the support set; never differentiates through the inner solve.

    ``regu_coef``, ``lam_damping`` (both >= 0, default 0: the paper's system above) damp the system as the
    authors' released code does (aravindr93/imaml_dev, ``implicit_maml/learner_model.py``,
    ``Learner.matrix_evaluator``: ``regu_coef`` is its ``--cg_damping``, 1.0, ``lam_damping`` its default 10.0):

        ((1 + regu_coef) I + H_i / (lam + lam_damping)) g_i = grad L_i^test(phi_i).

    With 1 and 10 and lam 2 the solution is close to grad L_i^test / 2 (H_i / 12 is small beside 2 I).
    The matrix-vector product is the value handed to :func:`cg`; its ``negative_curvature`` flags the tasks
    whose system was not positive definite along a CG direction.
    """
    hessian = backend.hessian_operator(loss_fn, phi, *support)
    # A = (1 + regu_coef) (I + H_i / c), c = (1 + regu_coef)(lam + lam_damping)   (paper, Eq. 7: regu_coef = lam_damping = 0)
    # so g_i = (I + H_i / c)^{-1} b / (1 + regu_coef): the damping costs one scaling of b, not one per CG step
    scale, c = 1.0 + regu_coef, (1.0 + regu_coef) * (lam + lam_damping)
    b = query_grad if scale == 1.0 else {k: v / scale for k, v in query_grad.items()}
    result = cg(lambda v: _axpy(1.0 / c, hessian(v), v), b, cg_steps, cg_tol)  # (I + H_i/c) v
    if scale != 1.0:
        result.residual = result.residual * scale  # ||grad L_i^test - A g_i||
    return result


# --------------------------------------------------------------------------- MAML

def maml_meta_grads(backend: TaskBackend, loss_fn: LossFn, theta: Params, support: tuple[Tensor, Tensor],
                    query: tuple[Tensor, Tensor], inner_steps: int, inner_lr: float
                    ) -> tuple[TaskParams, Tensor, Tensor]:
    """Second-order MAML meta-gradients of every task (Finn et al. 2017, Eq. 1):

        g_i = d/dtheta L_i^test(phi_i(theta)),   phi_i = theta - inner_lr * sum_t grad L_i^train(phi_i^t),

    differentiating through all ``inner_steps`` (memory grows with them); how the unroll is differentiated is
    the backend's (``vmap(grad)`` of the per-task objective, or plain autograd on one copy of theta per task).
    Returns per-task gradients ``[T, ...]``, query losses ``[T]`` and query outputs ``[T, B, ...]``.
    """
    return backend.maml_meta_grads(loss_fn, theta, support, query, inner_steps, inner_lr)
