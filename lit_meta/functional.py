"""Pure functions over parameter dicts, batched over a leading task dimension.

No Lightning, no state: every function takes the network (only for its architecture), a dict of
parameters and tensors, and returns tensors. ``Params`` without a task dimension are shared by all
tasks (meta-parameters theta); ``TaskParams`` carry a leading dimension ``T``, one set per task.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

Params = dict[str, Tensor]
TaskParams = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def loss_for(target: Tensor) -> LossFn:
    """Cross-entropy for integer class labels, mean squared error for real-valued targets."""
    return F.cross_entropy if not target.is_floating_point() else F.mse_loss


def params_of(net: nn.Module) -> Params:
    """The trainable parameters of ``net`` as a dict (the tensors themselves, so gradients reach them)."""
    return {name: p for name, p in net.named_parameters() if p.requires_grad}


def expand_to_tasks(params: Params, n_tasks: int) -> TaskParams:
    """One independent copy of ``params`` per task: ``[*shape] -> [T, *shape]``."""
    return {k: v.detach().unsqueeze(0).expand(n_tasks, *v.shape).clone() for k, v in params.items()}


def task_loss(net: nn.Module, loss_fn: LossFn, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """L(params; x, y) for ONE task (x ``[B, ...]``, y ``[B, ...]``); vmap it over tasks."""
    return loss_fn(functional_call(net, params, (x,)), y)


def task_logits(net: nn.Module, params: TaskParams, x: Tensor) -> Tensor:
    """Outputs of ``net`` for every task with its own weights: params ``[T, ...]``, x ``[T, B, ...]``."""
    return vmap(lambda p, xb: functional_call(net, p, (xb,)))(params, x)


def inner_gd(
    net: nn.Module,
    loss_fn: LossFn,
    theta: Params,
    x: Tensor,
    y: Tensor,
    inner_steps: int,
    inner_lr: float,
    lam: float = 0.0,
) -> TaskParams:
    """Gradient descent on the proximal task objective, all tasks at once.

    Eq. (iMAML, Rajeswaran et al. 2019, Eq. 4): phi_i = argmin_phi L_i(phi) + lam/2 ||phi - theta||^2,
    approximated by ``inner_steps`` steps phi <- phi - inner_lr * (grad L_i(phi) + lam (phi - theta)),
    starting from phi = theta. ``lam = 0`` is plain fine-tuning from theta.

    Shapes: theta without task dim; x ``[T, B, ...]``, y ``[T, B, ...]``; returns phi ``[T, ...]``.
    Nothing is differentiated through the steps: phi is detached from theta.
    """
    n_tasks = x.shape[0]
    theta = {k: v.detach() for k, v in theta.items()}
    phi = expand_to_tasks(theta, n_tasks)
    grad_fn = vmap(grad(lambda p, xb, yb: task_loss(net, loss_fn, p, xb, yb)))
    for _ in range(inner_steps):
        g = grad_fn(phi, x, y)
        phi = {k: phi[k] - inner_lr * (g[k] + lam * (phi[k] - theta[k])) for k in phi}
    return phi
