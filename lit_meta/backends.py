"""How a network runs for many tasks at once, each with its own weights: the task-batched backends.

The algorithms in :mod:`lit_meta.functional` (inner solve, CG meta-gradient, MAML) are written once against
:class:`TaskBackend`; a backend is the one place an execution strategy lives. Two ship:

- :class:`VmapBackend`: any ``nn.Module`` without running statistics. ``torch.func.functional_call`` under
  ``vmap``; per-task gradients by ``vmap(grad)``, Hessian-vector products by ``jvp`` of ``grad`` (forward over
  reverse: reverse over reverse through BatchNorm raises under ``vmap``), MAML by ``vmap(grad)`` of the unrolled
  objective.
- :class:`FoldedBackend`: a :class:`FoldedNet`, a network that computes all tasks in one forward of its own
  (``forward_tasks``; :class:`lit_meta.nets.Conv4` folds the tasks into the channels of grouped convolutions).
  No ``vmap``: plain autograd on the summed per-task losses (task i's loss depends only on its own weights, so
  the gradient of the sum is every task's own gradient); the gradient's graph is built once per CG solve and
  every Hessian-vector product is one more backward through it.

:func:`task_backend` picks one, once (the learners call it at construction: ``backend="auto"|"vmap"|"folded"``):
the folded backend for a :class:`FoldedNet`, else ``vmap``. A fast backend for a new architecture is a
:class:`FoldedNet` subclass implementing ``forward_tasks`` (checked against ``VmapBackend`` by the tests of
``Conv4``), or a :class:`TaskBackend` subclass for another strategy altogether.

Shapes: per-task parameters ``TaskParams`` ``{name: [T, *shape]}``, inputs ``[T, B, ...]``, targets ``[T, B, ...]``.

    >>> import torch
    >>> from lit_meta import MLP
    >>> from lit_meta.backends import task_backend
    >>> from lit_meta.functional import expand_to_tasks, mse_loss, params_of
    >>> backend = task_backend(MLP(1, 1, hidden=(8,)))      # an MLP has no all-tasks forward: vmap
    >>> type(backend).__name__
    'VmapBackend'
    >>> phi = expand_to_tasks(params_of(backend.net), 3)   # 3 tasks, one copy of the weights each
    >>> grads, losses, outputs = backend.grads_and_outputs(mse_loss, phi, torch.randn(3, 10, 1), torch.randn(3, 10, 1))
    >>> grads["layers.0.weight"].shape, losses.shape, outputs.shape
    (torch.Size([3, 8, 1]), torch.Size([3]), torch.Size([3, 10, 1]))
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, jvp, vmap

Params = dict[str, Tensor]
TaskParams = dict[str, Tensor]
LossFn = Callable[..., Tensor]  # loss_fn(outputs, targets, reduction="mean" | "none")
BackendKind = Literal["auto", "vmap", "folded"]
BACKEND_KINDS = ("auto", "vmap", "folded")


def params_of(net: nn.Module) -> Params:
    """The trainable parameters of ``net`` as a dict (the tensors themselves, so gradients reach them)."""
    return {name: p for name, p in net.named_parameters() if p.requires_grad}


def broadcast_to_tasks(params: Params, n_tasks: int) -> TaskParams:
    """The same ``params`` for every task, as a detached view ``[*shape] -> [T, *shape]`` (no copy: read only)."""
    return {k: v.detach().expand(n_tasks, *v.shape) for k, v in params.items()}


def expand_to_tasks(params: Params, n_tasks: int) -> TaskParams:
    """One independent copy of ``params`` per task: ``[*shape] -> [T, *shape]`` (detached)."""
    return {k: v.clone() for k, v in broadcast_to_tasks(params, n_tasks).items()}


def per_task_loss(loss_fn: LossFn, outputs: Tensor, y: Tensor) -> Tensor:
    """Per-task mean loss ``[T]`` of outputs ``[T, B, ...]`` against y ``[T, B, ...]``."""
    return loss_fn(outputs.flatten(0, 1), y.flatten(0, 1), reduction="none").view(y.shape[0], -1).mean(1)


class FoldedNet(nn.Module):
    """A network with its own all-tasks forward: subclass it and implement :meth:`forward_tasks` to get the
    :class:`FoldedBackend` (no ``vmap``; derivatives of any order by plain autograd through your forward).

    ``forward_tasks`` must equal ``vmap(lambda p, x: functional_call(self, p, (x,)))(params, x)``; test it against
    :class:`VmapBackend` as ``tests/test_functional.py`` does for :class:`~lit_meta.nets.Conv4`.
    """

    @abstractmethod
    def forward_tasks(self, params: TaskParams, x: Tensor) -> Tensor:
        """Outputs ``[T, B, ...]`` of T copies of this network, copy t with the weights ``params[name][t]``
        (a parameter missing from ``params`` is shared by all tasks), on x ``[T, B, ...]``."""
        raise NotImplementedError(f"{type(self).__name__} subclasses FoldedNet but does not implement forward_tasks")


class TaskBackend(ABC):
    """Runs ``net`` for T tasks at once, task t with its own weights; what :mod:`lit_meta.functional` needs.

    Args:
        net: the network (only its architecture is used: the weights come as arguments).
    """

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.net).__name__})"

    @abstractmethod
    def outputs(self, params: TaskParams, x: Tensor) -> Tensor:
        """Outputs ``[T, B, ...]`` of per-task weights ``params`` ``[T, ...]`` on x ``[T, B, ...]``."""

    @abstractmethod
    def grads_and_outputs(self, loss_fn: LossFn, params: TaskParams, x: Tensor, y: Tensor
                          ) -> tuple[TaskParams, Tensor, Tensor]:
        """Per-task gradients ``[T, ...]`` of L_t(params_t; x_t, y_t), losses ``[T]`` and outputs ``[T, B, ...]``
        in one pass (not differentiable further)."""

    @abstractmethod
    def hessian_operator(self, loss_fn: LossFn, params: TaskParams, x: Tensor, y: Tensor
                         ) -> Callable[[TaskParams], TaskParams]:
        """v -> (H_t v_t)_t, H_t = d^2 L_t / d params_t^2 at ``params``: the matrix of the several products of
        one CG solve (products not differentiable further)."""

    @abstractmethod
    def maml_meta_grads(self, loss_fn: LossFn, theta: Params, support: tuple[Tensor, Tensor],
                        query: tuple[Tensor, Tensor], inner_steps: int, inner_lr: float
                        ) -> tuple[TaskParams, Tensor, Tensor]:
        """Per-task d/dtheta L_t^query(phi_t(theta)) through ``inner_steps`` SGD steps on the support set, with the
        query losses ``[T]`` and outputs (see :func:`lit_meta.functional.maml_meta_grads`)."""

    def losses(self, loss_fn: LossFn, params: TaskParams, x: Tensor, y: Tensor) -> Tensor:
        """Per-task losses ``[T]``."""
        return per_task_loss(loss_fn, self.outputs(params, x), y)

    def grads(self, loss_fn: LossFn, params: TaskParams, x: Tensor, y: Tensor) -> tuple[TaskParams, Tensor]:
        """Per-task gradients ``[T, ...]`` and losses ``[T]``."""
        g, loss, _ = self.grads_and_outputs(loss_fn, params, x, y)
        return g, loss

    def hvp(self, loss_fn: LossFn, params: TaskParams, x: Tensor, y: Tensor, v: TaskParams) -> TaskParams:
        """One product H_t v_t of :meth:`hessian_operator`."""
        return self.hessian_operator(loss_fn, params, x, y)(v)


class VmapBackend(TaskBackend):
    """Any network: ``functional_call`` under ``torch.func.vmap`` (see the module docstring)."""

    def _loss(self, loss_fn: LossFn, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """L(params; x, y) of ONE task."""
        return loss_fn(functional_call(self.net, params, (x,)), y)

    def outputs(self, params: TaskParams, x: Tensor) -> Tensor:
        return vmap(lambda p, xb: functional_call(self.net, p, (xb,)))(params, x)

    def grads_and_outputs(self, loss_fn: LossFn, params: TaskParams, x: Tensor, y: Tensor
                          ) -> tuple[TaskParams, Tensor, Tensor]:
        def one(p: Params, xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
            out = functional_call(self.net, p, (xb,))
            return loss_fn(out, yb), out

        g, (loss, out) = vmap(grad_and_value(one, has_aux=True))(params, x, y)
        return g, loss, out

    def hessian_operator(self, loss_fn: LossFn, params: TaskParams, x: Tensor, y: Tensor
                         ) -> Callable[[TaskParams], TaskParams]:
        def one(p: Params, vp: Params, xb: Tensor, yb: Tensor) -> Params:  # jvp of grad: one forward per product
            return jvp(lambda q: grad(lambda r: self._loss(loss_fn, r, xb, yb))(q), (p,), (vp,))[1]

        return lambda v: vmap(one)(params, v, x, y)

    def maml_meta_grads(self, loss_fn: LossFn, theta: Params, support: tuple[Tensor, Tensor],
                        query: tuple[Tensor, Tensor], inner_steps: int, inner_lr: float
                        ) -> tuple[TaskParams, Tensor, Tensor]:
        # vmap(grad) of the whole per-task objective: differentiating a batched vmap(grad) unroll with outer
        # autograd instead gives WRONG gradients through BatchNorm in torch 2.14 (tests: finite differences)
        def objective(th: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            phi = th
            for _ in range(inner_steps):
                g = grad(lambda p: self._loss(loss_fn, p, sx, sy))(phi)
                phi = {k: phi[k] - inner_lr * g[k] for k in phi}
            out = functional_call(self.net, phi, (qx,))
            return loss_fn(out, qy), out

        thetas = broadcast_to_tasks(theta, support[0].shape[0])
        grads, (losses, outputs) = vmap(grad_and_value(objective, has_aux=True))(thetas, *support, *query)
        return grads, losses, outputs


class FoldedBackend(TaskBackend):
    """A :class:`FoldedNet`: its ``forward_tasks`` and plain autograd, no ``vmap`` (see the module docstring).
    (No ``torch.func`` transform either: without ``vmap`` there is nothing for one to do, and under ``grad`` every
    operation, custom autograd Functions most, pays a wrapping cost.)"""

    net: FoldedNet

    def __init__(self, net: nn.Module) -> None:
        if not isinstance(net, FoldedNet):
            raise ValueError(f"backend='folded' needs a lit_meta.backends.FoldedNet (a network with forward_tasks, "
                             f"e.g. lit_meta.Conv4); {type(net).__name__} is not one: use backend='vmap' (or 'auto')")
        super().__init__(net)

    def outputs(self, params: TaskParams, x: Tensor) -> Tensor:
        return self.net.forward_tasks(params, x)

    def _summed_grads(self, loss_fn: LossFn, params: TaskParams, x: Tensor, y: Tensor, create_graph: bool = False
                      ) -> tuple[TaskParams, TaskParams, Tensor, Tensor]:
        """Gradients of sum_t L_t(params_t) on detached leaves: every task's own gradient ``[T, ...]``. Returns the
        leaves, the gradients, losses ``[T]`` and outputs; ``create_graph`` keeps the gradients' graph (HVPs)."""
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            out = self.net.forward_tasks(leaves, x)
            losses = per_task_loss(loss_fn, out, y)
            g = torch.autograd.grad(losses.sum(), list(leaves.values()), create_graph=create_graph)
        return leaves, dict(zip(leaves, g)), losses.detach(), out.detach()

    def grads_and_outputs(self, loss_fn: LossFn, params: TaskParams, x: Tensor, y: Tensor
                          ) -> tuple[TaskParams, Tensor, Tensor]:
        return self._summed_grads(loss_fn, params, x, y)[1:]

    def hessian_operator(self, loss_fn: LossFn, params: TaskParams, x: Tensor, y: Tensor
                         ) -> Callable[[TaskParams], TaskParams]:
        leaves, g, _, _ = self._summed_grads(loss_fn, params, x, y, create_graph=True)
        names, wrt, grads = list(leaves), list(leaves.values()), list(g.values())
        # v^T H_t = H_t v (H_t symmetric): every product one backward through the gradient's graph, built once
        return lambda v: dict(zip(names, torch.autograd.grad(grads, wrt, [v[k] for k in names], retain_graph=True)))

    def maml_meta_grads(self, loss_fn: LossFn, theta: Params, support: tuple[Tensor, Tensor],
                        query: tuple[Tensor, Tensor], inner_steps: int, inner_lr: float
                        ) -> tuple[TaskParams, Tensor, Tensor]:
        # one copy of theta per task: task t's query loss depends only on copy t, so d(sum)/d copy_t is task t's
        thetas = {k: v.requires_grad_() for k, v in expand_to_tasks(theta, support[0].shape[0]).items()}
        with torch.enable_grad():
            phi = thetas
            for _ in range(inner_steps):
                losses = per_task_loss(loss_fn, self.net.forward_tasks(phi, support[0]), support[1])
                g = torch.autograd.grad(losses.sum(), list(phi.values()), create_graph=True)
                phi = {k: phi[k] - inner_lr * gk for k, gk in zip(phi, g)}
            outputs = self.net.forward_tasks(phi, query[0])
            losses = per_task_loss(loss_fn, outputs, query[1])
            grads = torch.autograd.grad(losses.sum(), list(thetas.values()))
        return dict(zip(thetas, grads)), losses.detach(), outputs.detach()


def task_backend(net: nn.Module, kind: BackendKind = "auto") -> TaskBackend:
    """The backend that runs ``net`` for many tasks: ``"auto"`` (default) the :class:`FoldedBackend` for a
    :class:`FoldedNet`, else the :class:`VmapBackend`; ``"vmap"`` / ``"folded"`` that one (``"folded"`` needs a
    :class:`FoldedNet`: a ``ValueError`` says so otherwise)."""
    if kind not in BACKEND_KINDS:
        raise ValueError(f"backend={kind!r} is not one of {BACKEND_KINDS}")
    if kind == "folded" or (kind == "auto" and isinstance(net, FoldedNet)):
        return FoldedBackend(net)
    return VmapBackend(net)
