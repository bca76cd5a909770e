"""A probabilistic ensemble of dynamics models trained by Gaussian negative log-likelihood: PETS's model
(Chua et al. 2018, "Deep Reinforcement Learning in a Handful of Trials using Probabilistic Dynamics Models"),
as mbrl-lib's ``GaussianMLP`` builds it, here the non-adaptive baseline next to MB-MPC's single MSE-trained MLP.

- :class:`GaussianEnsemble`: ``n_members`` MLPs (SiLU) held as batched weights ``[M, in, out]`` per layer (one
  batched matmul per layer for all members). Each member outputs the mean and log-variance of a diagonal Gaussian
  over the normalised state change; the log-variance is soft-bounded between learned ``min_logvar`` and
  ``max_logvar`` (PETS appendix A.1).
- :class:`PETS`: the learner. Every member sees its own bootstrap resample of each batch; the loss is the sum over
  members of their Gaussian NLL plus ``logvar_penalty * (max_logvar.sum() - min_logvar.sum())``. No adaptation;
  :meth:`PETS.predict` returns the ensemble's mean prediction (the mean over members of their means), so the MPC
  controller, :func:`~lit_meta.rl.control.evaluate` and the diagnostics use it as they use MB-MPC; with
  ``propagation="ts"`` the planner's rows instead follow one member each, sampling its Gaussian (PETS's TS-inf with
  one particle per candidate).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_meta.episode import Episode, Transitions
from lit_meta.functional import TaskParams
from lit_meta.rl.learners import SupervisedDynamics

#: PETS's HalfCheetah model: 4 hidden layers of 200 units (Chua et al. 2018; mbrl-lib's pets_halfcheetah).
PETS_HIDDEN = (200, 200, 200, 200)
LOG_2PI = math.log(2 * math.pi)


def gaussian_nll(mean: Tensor, logvar: Tensor, target: Tensor) -> Tensor:
    """Elementwise negative log-likelihood of ``target`` under N(mean, exp(logvar)) (nats, with the 2 pi term)."""
    return 0.5 * ((target - mean).square() * torch.exp(-logvar) + logvar + LOG_2PI)


def _truncated_normal_(weight: Tensor, fan_in: int) -> Tensor:
    """PETS's initialisation: normal of std 1 / (2 sqrt(fan_in)), truncated at 2 std."""
    std = 1.0 / (2.0 * math.sqrt(fan_in))
    return nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


class GaussianEnsemble(nn.Module):
    """``n_members`` Gaussian MLPs with batched weights: member m maps x to (mean_m(x), logvar_m(x)).

    Args:
        in_features: input size (23 for HalfCheetah without its x position). Default 23.
        out_features: output size, the predicted normalised change (18). Default 18.
        hidden: sizes of the hidden layers (SiLU). Default (200, 200, 200, 200), PETS's HalfCheetah model.
        n_members: ensemble size. Default 5 (PETS).
        max_logvar, min_logvar: initial soft bounds of the log-variance (learned, one per output). Defaults 0.5
            and -10 (PETS, mbrl-lib), in log units of the target's variance (the targets are normalised: 1 is the
            data's variance).

    Parameters: ``weight{i}`` ``[M, in_i, out_i]``, ``bias{i}`` ``[M, out_i]``; the last layer has
    ``2 * out_features`` outputs (means, then raw log-variances); ``max_logvar``, ``min_logvar`` ``[out]``.
    """

    def __init__(self, in_features: int = 23, out_features: int = 18, hidden: Sequence[int] = PETS_HIDDEN,
                 n_members: int = 5, max_logvar: float = 0.5, min_logvar: float = -10.0) -> None:
        super().__init__()
        sizes = [in_features, *hidden, 2 * out_features]
        if min(sizes) < 1 or n_members < 1:
            raise ValueError(f"layer sizes {sizes} and n_members={n_members} must all be >= 1")
        if not min_logvar < max_logvar:
            raise ValueError(f"min_logvar={min_logvar} must be below max_logvar={max_logvar}")
        self.in_features, self.out_features, self.n_members = in_features, out_features, n_members
        self.n_layers = len(sizes) - 1
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            self.register_parameter(f"weight{i}", nn.Parameter(_truncated_normal_(torch.empty(n_members, a, b), a)))
            self.register_parameter(f"bias{i}", nn.Parameter(torch.zeros(n_members, b)))
        self.max_logvar = nn.Parameter(torch.full((out_features,), float(max_logvar)))
        self.min_logvar = nn.Parameter(torch.full((out_features,), float(min_logvar)))

    def layers(self) -> list[tuple[Tensor, Tensor]]:
        """``[(weight [M, in, out], bias [M, out]), ...]`` of every layer."""
        return [(getattr(self, f"weight{i}"), getattr(self, f"bias{i}")) for i in range(self.n_layers)]

    def forward(self, x: Tensor, per_member: bool = False) -> tuple[Tensor, Tensor]:
        """(mean, logvar), each ``[M, ..., out]``, of every member on x ``[..., in]`` (the same input for all
        members), or, with ``per_member``, on x ``[M, ..., in]`` (member m on ``x[m]``: bootstrapped batches)."""
        m = self.n_members
        if per_member:
            if x.shape[0] != m:
                raise ValueError(f"per_member inputs need a leading size {m} (the members), got {tuple(x.shape)}")
            lead = x.shape[1:-1]
            h = x.reshape(m, -1, x.shape[-1])
        else:
            lead = x.shape[:-1]
            h = x.reshape(1, -1, x.shape[-1]).expand(m, -1, -1)
        for i, (w, b) in enumerate(self.layers()):
            h = torch.baddbmm(b.unsqueeze(1), h, w)  # [M, N, out_i]: one batched matmul for all members
            if i < self.n_layers - 1:
                h = F.silu(h)
        mean, raw = h.split(self.out_features, dim=-1)
        # soft bounds (PETS A.1): smooth clamps into (min_logvar, max_logvar), gradients reach the bounds
        logvar = self.max_logvar - F.softplus(self.max_logvar - raw)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean.reshape(m, *lead, -1), logvar.reshape(m, *lead, -1)

    def member(self, index: int) -> nn.Sequential:
        """Member ``index`` as a plain ``nn.Sequential`` of ``nn.Linear`` + ``nn.SiLU`` (copies of its weights), whose
        output is ``[mean, raw logvar]`` before the soft bounds: for tests and inspection."""
        modules: list[nn.Module] = []
        for i, (w, b) in enumerate(self.layers()):
            linear = nn.Linear(w.shape[1], w.shape[2])
            with torch.no_grad():
                linear.weight.copy_(w[index].T)
                linear.bias.copy_(b[index])
            modules += [linear, nn.SiLU()] if i < self.n_layers - 1 else [linear]
        return nn.Sequential(*modules)


class PETS(SupervisedDynamics):
    """The PETS model as a non-adaptive dynamics learner: a probabilistic ensemble trained by Gaussian NLL on single
    transitions (Chua et al. 2018), planned with by the same MPC as MB-MPC.

    Training, per batch of B transitions: member m gets a bootstrap resample of the batch (B indices drawn with
    replacement, its own; ``bootstrap=False``: the batch itself for every member); loss = sum over members of the
    mean over the resample and the output dimensions of ``(y - mean)^2 / var + log var`` (mbrl-lib's scaling of the
    Gaussian NLL), plus ``logvar_penalty * (max_logvar.sum() - min_logvar.sum())``. Logged: ``train/nll`` every step, the
    Gaussian NLL in nats per output dimension (with the 2 pi term), mean over members and their resamples; and
    ``train/query_loss`` on the steps the loggers record (one more ensemble forward, after the update), the MSE of the
    ensemble mean on the batch (comparable to MB-MPC's).

    Args:
        net: a :class:`GaussianEnsemble` with input ``obs_dim - len(exclude_obs_dims) + action_dim`` and output
            ``obs_dim``. Default: ``GaussianEnsemble(in, obs_dim, hidden, n_members)``.
        n_members: ensemble size, when ``net`` is not given. Default 5 (PETS).
        hidden: hidden sizes of every member, when ``net`` is not given. Default (200, 200, 200, 200) (PETS's
            HalfCheetah model; planner cost per candidate about that of MB-MPC's 3 x 512 MLP).
        logvar_penalty: weight of the bounds' term. Default 0.01 (PETS, mbrl-lib).
        bootstrap: a bootstrap resample of each batch per member. Default True.
        propagation: what :meth:`predict` returns. ``"mean"`` (default): the mean over members of their means, for
            every row. ``"ts"``: row j of every task follows member ``j % n_members`` and samples its Gaussian (PETS's
            TS-inf with one particle per planner candidate, the planner's rows being its candidates); the samples
            come from torch's global generator. Training and its logged losses are the same for both.
        optimizer: default Adam (lr 1e-3); PETS adds weight decay (mbrl-lib's HalfCheetah: 3e-5), set in the config.
        obs_dim, action_dim, exclude_obs_dims, aggregate_every_n_epochs, mpc: see
            :class:`~lit_meta.rl.learners.DynamicsLearner`.
    """

    def __init__(self, net: GaussianEnsemble | None = None, obs_dim: int = 18, action_dim: int = 6,
                 exclude_obs_dims: Sequence[int] = (0,), aggregate_every_n_epochs: int = 1,
                 mpc: dict[str, Any] | None = None, optimizer: OptimizerCallable = torch.optim.Adam,
                 n_members: int = 5, hidden: Sequence[int] = PETS_HIDDEN, logvar_penalty: float = 0.01,
                 bootstrap: bool = True, propagation: Literal["mean", "ts"] = "mean") -> None:
        if net is None:
            net = GaussianEnsemble(self._in_features(obs_dim, action_dim, exclude_obs_dims), obs_dim, tuple(hidden),
                                   n_members)
        if not isinstance(net, GaussianEnsemble):
            raise ValueError(f"PETS needs a lit_meta.rl.GaussianEnsemble net, got {type(net).__name__}")
        if propagation not in ("mean", "ts"):
            raise ValueError(f"propagation={propagation!r} is not one of 'mean', 'ts'")
        if logvar_penalty < 0:
            raise ValueError(f"logvar_penalty={logvar_penalty} must be >= 0")
        super().__init__(net, obs_dim, action_dim, exclude_obs_dims, aggregate_every_n_epochs, mpc, optimizer)
        self.logvar_penalty, self.bootstrap, self.propagation = logvar_penalty, bootstrap, propagation

    # --- prediction (no adaptation: the state is the shared weights, :meth:`unadapted`) ---------------
    def predict(self, state: TaskParams, x: Tensor) -> Tensor:
        """Predicted normalised changes ``[T, B, obs_dim]`` on x ``[T, B, in]`` by the trained ensemble (the same
        for every task): its mean, or with ``propagation="ts"`` row j's member's Gaussian sample (see the class)."""
        mean, logvar = self.net(x)
        if self.propagation == "mean":
            return mean.mean(0)
        rows = torch.arange(x.shape[-2], device=x.device) % self.net.n_members  # [B]: row j -> member j % M
        index = rows.view(1, 1, -1, 1).expand(1, *mean.shape[1:])
        mu, lv = mean.gather(0, index)[0], logvar.gather(0, index)[0]
        return mu + torch.exp(0.5 * lv) * torch.randn_like(mu)

    # --- training --------------------------------------------------------------------------------
    def _inputs_targets(self, batch: Episode | Transitions) -> tuple[Tensor, Tensor]:
        """Model inputs ``[N, in]`` and normalised-change targets ``[N, obs_dim]`` of a batch (windows: all their
        past and future transitions alike)."""
        if isinstance(batch, Transitions):
            return self.normalizer.transitions(batch)
        inputs = torch.cat([batch.support_x, batch.query_x], dim=1)
        targets = torch.cat([batch.support_y, batch.query_y], dim=1)
        return inputs.reshape(-1, inputs.shape[-1]), targets.reshape(-1, targets.shape[-1])

    def losses(self, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """``loss`` (what is minimised, see the class) and ``nll`` (nats per output dimension, mean over members)
        of inputs ``[N, in]``, targets ``[N, out]``."""
        m, n = self.net.n_members, inputs.shape[0]
        if self.bootstrap:
            index = torch.randint(0, n, (m, n), device=inputs.device)
            x, y = inputs[index], targets[index]  # [M, N, ...]: member m's resample
        else:
            x, y = inputs.expand(m, *inputs.shape), targets.expand(m, *targets.shape)
        mean, logvar = self.net(x, per_member=True)
        nll = gaussian_nll(mean, logvar, y).mean((1, 2))  # [M]
        loss = (2 * nll - LOG_2PI).sum() + self.logvar_penalty * (self.net.max_logvar.sum() - self.net.min_logvar.sum())
        return {"loss": loss, "nll": nll.detach().mean()}

    def mean_mse(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """MSE of the ensemble mean (the mean over members of their means) on inputs ``[N, in]``, targets ``[N, out]``."""
        return (self.net(inputs)[0].mean(0) - targets).square().mean()

    def training_loss(self, batch: Episode | Transitions) -> Tensor:
        return self.losses(*self._inputs_targets(batch))["loss"]

    def training_losses(self, batch: Episode | Transitions) -> dict[str, Tensor]:
        return self.losses(*self._inputs_targets(batch))  # train/nll every step

    def logged_losses(self, batch: Episode | Transitions) -> dict[str, Tensor]:
        return {"query_loss": self.mean_mse(*self._inputs_targets(batch))}  # one more ensemble forward
