"""GrBAL, ReBAL and MB-MPC as LightningModules (Nagabandi et al. 2019, "Learning to Adapt in Dynamic,
Real-World Environments Through Meta-Reinforcement Learning").

Each window of M past and K future transitions (:class:`~lit_meta.episode.Window`) becomes a regression
episode (support = past, query = future, targets = normalised state changes, see
:mod:`lit_meta.rl.dynamics`), so the few-shot machinery applies unchanged:

- :class:`GrBAL` is MAML on windows: ``inner_steps`` of SGD on the M past transitions from the
  meta-learned weights, loss on the K future ones, second order (``first_order=False``, the paper)
  or first order.
- :class:`ImplicitGrBAL` is iMAML on windows: proximal inner solve + CG implicit meta-gradient (new:
  no published GrBAL code has it).
- :class:`ReBAL`: a recurrent model; adaptation is the hidden state after reading the M past
  transitions; trained by backpropagation through time.
- :class:`MBMPC`: the same MLP trained on single transitions, no adaptation (the paper's baseline).

Validation reports ``val/pre_query_loss`` and ``val/query_loss``: the K-step (one step ahead) prediction
error of the normalised state change on held-out-task windows without and with adaptation. All four
share the data-aggregation hook: every ``aggregate_every_n_epochs`` epochs the DataModule collects a
new round of rollouts with :meth:`DynamicsLearner.policy`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_meta.episode import Episode, Transitions, Window
from lit_meta.functional import InnerObjective, TaskParams, per_task_loss, mse_loss
from lit_meta.learners import IMAML, MAML, AdaptiveLearner, EvalAdaptation, NanPolicy
from lit_meta.nets import MLP
from lit_meta.rl.control import check_mpc
from lit_meta.rl.dynamics import Normalizer, open_loop_loss

PAPER_HIDDEN = (512, 512, 512)


class DynamicsLearner:
    """What the dynamics learners add to the few-shot learners (a mixin, listed first in the bases).

    Args (of every subclass):
        obs_dim: observation size of the env (HalfCheetah with its x position: 18). Checked against the
            DataModule's env at setup.
        action_dim: action size (HalfCheetah: 6).
        exclude_obs_dims: observation indices left out of the model input (default ``[0]``, the x position).
        aggregate_every_n_epochs: collect a new round of rollouts with :meth:`policy` at the start of every
            n-th epoch (not epoch 0); 0 never. Default 1. Each round logs ``rollout/planner_ms_per_step`` (mean ms
            of one adapt + plan call for all envs) and ``rollout/n_nonfinite`` (candidates with non-finite predictions).
        mpc: arguments of the :class:`~lit_meta.rl.control.MPCController` that collects those rollouts
            (``planner``, ``horizon``, ``n_candidates``, ``planner_kwargs``, ``adapt``, ``seed``). Default: random
            shooting, 500 candidates, horizon 10 (paper). Checked when the learner is built
            (:func:`~lit_meta.rl.control.check_mpc`): an unknown key, planner or planner argument, or a value out
            of range, is a ValueError naming it, not a failure after the random rollouts.
    """

    normalizer: Normalizer

    def _init_dynamics(self, obs_dim: int, action_dim: int, exclude_obs_dims: Sequence[int],
                       aggregate_every_n_epochs: int, mpc: dict[str, Any] | None) -> None:
        if obs_dim < 1 or action_dim < 1:
            raise ValueError(f"obs_dim={obs_dim} and action_dim={action_dim} must be >= 1")
        if aggregate_every_n_epochs < 0:
            raise ValueError(f"aggregate_every_n_epochs={aggregate_every_n_epochs} must be >= 0 (0: never)")
        check_mpc(mpc)
        self.normalizer = Normalizer(obs_dim, action_dim, exclude_obs_dims)
        self.aggregate_every_n_epochs = aggregate_every_n_epochs
        self.mpc = dict(mpc or {})
        self._stats_round = -1

    @staticmethod
    def _in_features(obs_dim: int, action_dim: int, exclude_obs_dims: Sequence[int]) -> int:
        """The model's input size: the kept observation dimensions and the action."""
        return obs_dim - len(set(exclude_obs_dims)) + action_dim

    @classmethod
    def _default_net(cls, net: nn.Module | None, obs_dim: int, action_dim: int, exclude_obs_dims: Sequence[int]
                     ) -> nn.Module:
        """The paper's 3 x 512 ReLU MLP when no net is given."""
        if net is not None:
            return net
        return MLP(cls._in_features(obs_dim, action_dim, exclude_obs_dims), obs_dim, PAPER_HIDDEN)

    # --- hooks -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "collector"):
            envs = datamodule.collector("train").envs
            obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
            if (obs_dim, action_dim) != (self.normalizer.obs_dim, self.normalizer.action_dim):
                raise ValueError(
                    f"the model was built for obs_dim={self.normalizer.obs_dim}, action_dim={self.normalizer.action_dim} "
                    f"but {datamodule.env_id} has observations of size {obs_dim} and actions of size {action_dim}; "
                    f"set model.init_args.obs_dim/action_dim (and the net's sizes) to the env's"
                )
        needs = self.window_steps_needed()
        batch_type = getattr(datamodule, "batch_type", None)
        if needs and batch_type == "transitions":  # fail now, not after the random rollouts
            raise ValueError(f"{type(self).__name__}{self._needs_what()} trains on consecutive transitions, but the "
                             f"DataModule gives single transitions: set data.init_args.batch_type=windows")
        if needs and batch_type == "windows" and datamodule.past_window + datamodule.future_window < needs:
            raise ValueError(f"{type(self).__name__}{self._needs_what()} needs windows of >= {needs} transitions, but "
                             f"past_window + future_window = {datamodule.past_window + datamodule.future_window}: "
                             f"lengthen the windows (data.init_args.past_window / future_window)")

    def window_steps_needed(self) -> int:
        """Consecutive transitions a training batch must hold (0: single transitions will do). Checked against the
        DataModule when the fit starts. Default 2: the meta-learners adapt on a window's past transitions and are
        scored on its next ones."""
        return 2

    def _needs_what(self) -> str:
        return ""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self._sync_stats()
        if isinstance(batch, Window) or (isinstance(batch, (list, tuple)) and len(batch) == len(Window._fields)):
            return self.normalizer.episode(Window(*batch))
        return Transitions(*batch)

    def _sync_stats(self) -> None:
        """Take the DataModule's normalisation statistics whenever it collected a new round."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        stats = getattr(datamodule, "stats", None)
        if stats and datamodule.round != self._stats_round:
            self.normalizer.set_stats({k: v.to(self.device) for k, v in stats.items()})
            self._stats_round = datamodule.round

    def on_train_epoch_start(self) -> None:
        n, epoch = self.aggregate_every_n_epochs, self.current_epoch
        datamodule = getattr(self.trainer, "datamodule", None)
        # round r (r >= 1) is collected at epoch r * n; a run restored from a checkpoint written after this epoch's
        # round (e.g. in on_train_epoch_start) has it already in its restored buffer: do not collect it twice
        if n and epoch > 0 and epoch % n == 0 and hasattr(datamodule, "aggregate") and datamodule.round <= epoch // n:
            controller = self.policy()
            datamodule.aggregate(controller)
            # this round's planner cost (ms of one adapt + plan call for all envs) and non-finite candidates
            self.log("rollout/planner_ms_per_step", float(controller.ms_per_step), on_step=False, on_epoch=True,
                     batch_size=1)
            self.log("rollout/n_nonfinite", float(controller.n_nonfinite), on_step=False, on_epoch=True, batch_size=1)

    def policy(self) -> Callable[[np.ndarray], np.ndarray]:
        """The controller that collects the next round of rollouts: online adaptation + MPC with this model, plus the
        DataModule's exploration noise (``action_noise``)."""
        from lit_meta.rl.control import MPCController, env_reward_fns

        data = self.trainer.datamodule
        reward_fn, termination_fn = env_reward_fns(data.env_id, {**data.env_kwargs, "task_split": "train"})
        collector = data.collector("train")
        return MPCController(self, reward_fn, termination_fn, collector.action_low, collector.action_high,
                             past_window=data.past_window, action_noise=getattr(data, "action_noise", 0.0), **self.mpc)


class GrBAL(DynamicsLearner, MAML):
    """GrBAL: gradient-based adaptive learner, MAML on windows of transitions.

    Per window: phi = theta - inner_lr * grad L_past(theta) (``inner_steps`` times); meta-loss
    L_future(phi); theta.grad = mean over windows of its gradient, second order through the inner steps
    (``first_order=True``: treated as constants). Outer optimizer: Adam 1e-3 by default.

    Args:
        net: the dynamics model, input ``obs_dim - len(exclude_obs_dims) + action_dim``, output ``obs_dim``.
            Default: the paper's 3 x 512 ReLU MLP.
        inner_steps: SGD steps of adaptation (paper: 1). Default 1.
        inner_lr: adaptation step size. Default 0.01.
        first_order: first-order meta-gradient. Default False.
        obs_dim, action_dim, exclude_obs_dims, aggregate_every_n_epochs, mpc: see :class:`DynamicsLearner`.
        optimizer, lr_scheduler, nan_policy, task_chunk_size, max_skip_fraction, skip_window: see
            :class:`~lit_meta.learners.MetaLearner`.
    """

    def __init__(self, net: nn.Module | None = None, obs_dim: int = 18, action_dim: int = 6,
                 exclude_obs_dims: Sequence[int] = (0,), inner_steps: int = 1, inner_lr: float = 0.01,
                 first_order: bool = False, aggregate_every_n_epochs: int = 1, mpc: dict[str, Any] | None = None,
                 optimizer: OptimizerCallable = torch.optim.Adam, lr_scheduler: LRSchedulerCallable | None = None,
                 nan_policy: NanPolicy = "raise", task_chunk_size: int | None = None, max_skip_fraction: float = 0.5,
                 skip_window: int = 50) -> None:
        super().__init__(self._default_net(net, obs_dim, action_dim, exclude_obs_dims), inner_steps, inner_lr,
                         first_order, optimizer, lr_scheduler, nan_policy, task_chunk_size,
                         max_skip_fraction=max_skip_fraction, skip_window=skip_window)
        self._init_dynamics(obs_dim, action_dim, exclude_obs_dims, aggregate_every_n_epochs, mpc)


class ImplicitGrBAL(DynamicsLearner, IMAML):
    """GrBAL with the implicit (iMAML) meta-gradient: phi ~ argmin L_past(phi) + lam/2 ||phi - theta||^2,
    then (I + H/lam) g = grad L_future(phi) by CG. Memory does not grow with ``inner_steps``.

    Args: as :class:`~lit_meta.learners.IMAML` (defaults here: lam 1.0, 5 inner steps of lr 0.01,
    5 CG steps; ``nan_policy``, ``max_skip_fraction``, ``skip_window``: see :class:`~lit_meta.learners.MetaLearner`;
    ``inner_objective``, ``regu_coef``, ``lam_damping``, ``eval_adaptation``: the released iMAML recipe's switches,
    defaults the paper's algorithm, see :class:`~lit_meta.learners.IMAML`; ``eval_adaptation`` also sets how the
    MPC controller adapts) plus ``obs_dim``, ``action_dim``, ``exclude_obs_dims``, ``aggregate_every_n_epochs``,
    ``mpc`` (:class:`DynamicsLearner`). Default net: the paper's 3 x 512 ReLU MLP.
    """

    def __init__(self, net: nn.Module | None = None, obs_dim: int = 18, action_dim: int = 6,
                 exclude_obs_dims: Sequence[int] = (0,), lam: float = 1.0, inner_steps: int = 5,
                 inner_lr: float = 0.01, inner_solver: Literal["gd", "adam", "hessian_free"] = "gd",
                 cg_steps: int = 5, cg_tol: float = 1e-10, aggregate_every_n_epochs: int = 1,
                 mpc: dict[str, Any] | None = None, optimizer: OptimizerCallable = torch.optim.Adam,
                 lr_scheduler: LRSchedulerCallable | None = None, nan_policy: NanPolicy = "raise",
                 task_chunk_size: int | None = None, max_skip_fraction: float = 0.5, skip_window: int = 50,
                 inner_objective: InnerObjective = "proximal", regu_coef: float = 0.0, lam_damping: float = 0.0,
                 eval_adaptation: EvalAdaptation = "as_training") -> None:
        super().__init__(self._default_net(net, obs_dim, action_dim, exclude_obs_dims), lam, inner_steps, inner_lr,
                         inner_solver, cg_steps, cg_tol, optimizer, lr_scheduler, nan_policy, task_chunk_size,
                         max_skip_fraction=max_skip_fraction, skip_window=skip_window, inner_objective=inner_objective,
                         regu_coef=regu_coef, lam_damping=lam_damping, eval_adaptation=eval_adaptation)
        self._init_dynamics(obs_dim, action_dim, exclude_obs_dims, aggregate_every_n_epochs, mpc)


class SupervisedDynamics(DynamicsLearner, AdaptiveLearner):
    """Base of the learners trained by plain backpropagation of the prediction loss (MB-MPC, PETS, ReBAL): no inner
    loop; :meth:`adapt` adapts nothing unless a subclass says otherwise (ReBAL: the recurrent state)."""

    def __init__(self, net: nn.Module, obs_dim: int, action_dim: int, exclude_obs_dims: Sequence[int],
                 aggregate_every_n_epochs: int, mpc: dict[str, Any] | None, optimizer: OptimizerCallable) -> None:
        super().__init__(net)
        self._init_dynamics(obs_dim, action_dim, exclude_obs_dims, aggregate_every_n_epochs, mpc)
        self.optimizer_factory = optimizer

    def configure_optimizers(self) -> Any:
        return self.optimizer_factory(self.net.parameters())

    def window_steps_needed(self) -> int:
        return 0  # a one-step prediction loss: single transitions will do

    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskParams:
        """No adaptation (the default; ReBAL adapts its hidden state): the trained weights for every task."""
        return self.unadapted(support_x.shape[0])

    def training_loss(self, batch: Episode | Transitions) -> Tensor:
        """The prediction loss a training step minimises."""
        raise NotImplementedError

    def training_losses(self, batch: Episode | Transitions) -> dict[str, Tensor]:
        """``loss``, what a training step minimises, and what every step logs as ``train/<key>`` for the other
        keys, at no extra cost. Default: ``query_loss`` (``train/query_loss``, the prediction MSE) is the loss."""
        loss = self.training_loss(batch)
        return {"loss": loss, "query_loss": loss}

    def logged_losses(self, batch: Episode | Transitions) -> dict[str, Tensor]:
        """Metrics that cost an extra forward pass, logged as ``train/<key>`` only on the steps the loggers record
        (after the step's update, without gradients). Default: none."""
        return {}

    def training_step(self, batch: Episode | Transitions, batch_idx: int) -> Tensor:
        out = self.training_losses(batch)
        loss = out.pop("loss")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss is {loss.item()}: lower the learning rate")
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)  # through DDP's reducer: every rank applies the same update
        optimizer.step()
        if self._logging_this_step():
            with torch.no_grad():
                out.update(self.logged_losses(batch))
        for key, value in out.items():
            self.log(f"train/{key}", value.detach(), prog_bar=key == "query_loss", batch_size=len(batch[0]))
        return loss


class MBMPC(SupervisedDynamics):
    """MB-MPC: the dynamics MLP trained on single transitions, never adapted (the paper's baseline).

    Batches: :class:`~lit_meta.episode.Transitions` (``RolloutDataModule(batch_type="transitions")``) or
    windows, whose past and future transitions are then used alike. Validation adapts nothing: its
    pre- and post-adaptation losses are equal.

    Args:
        net: the dynamics model. Default: the paper's 3 x 512 ReLU MLP.
        optimizer: default Adam (lr 1e-3).
        loss_horizon: steps of the training loss. 1 (default): the one-step MSE (the paper's). H > 1: the
            model rolled out open loop for H steps on the recorded actions
            (:func:`~lit_meta.rl.dynamics.open_loop_loss`), from every H-th step of each window; needs window
            batches (``batch_type="windows"``) with ``past_window + future_window >= H``. The planner compounds
            its horizon's steps, so this trains what it uses.
        obs_dim, action_dim, exclude_obs_dims, aggregate_every_n_epochs: see :class:`DynamicsLearner`.
    """

    def __init__(self, net: nn.Module | None = None, obs_dim: int = 18, action_dim: int = 6,
                 exclude_obs_dims: Sequence[int] = (0,), aggregate_every_n_epochs: int = 1,
                 mpc: dict[str, Any] | None = None, optimizer: OptimizerCallable = torch.optim.Adam,
                 loss_horizon: int = 1) -> None:
        super().__init__(self._default_net(net, obs_dim, action_dim, exclude_obs_dims), obs_dim, action_dim,
                         exclude_obs_dims, aggregate_every_n_epochs, mpc, optimizer)
        if isinstance(loss_horizon, bool) or not isinstance(loss_horizon, int) or loss_horizon < 1:
            raise ValueError(f"loss_horizon={loss_horizon!r}: must be an integer >= 1 (1: the one-step loss)")
        self.loss_horizon = loss_horizon

    def window_steps_needed(self) -> int:
        return self.loss_horizon if self.loss_horizon > 1 else 0

    def _needs_what(self) -> str:
        return f"(loss_horizon={self.loss_horizon})"

    def training_loss(self, batch: Episode | Transitions) -> Tensor:
        if isinstance(batch, Transitions):
            if self.loss_horizon > 1:
                raise ValueError(
                    f"loss_horizon={self.loss_horizon} needs consecutive transitions: set the DataModule's "
                    f"batch_type='windows' (data.init_args.batch_type), or loss_horizon=1")
            inputs, targets = self.normalizer.transitions(batch)
            return mse_loss(self.net(inputs), targets)
        inputs = torch.cat([batch.support_x, batch.query_x], dim=1)
        targets = torch.cat([batch.support_y, batch.query_y], dim=1)
        if self.loss_horizon == 1:
            return mse_loss(self.net(inputs), targets)
        H, length = self.loss_horizon, inputs.shape[1]
        if length < H:
            raise ValueError(f"loss_horizon={H} is longer than the windows ({length} transitions = past_window + "
                             f"future_window): lower loss_horizon or lengthen the windows")
        n = length // H  # sequences per window: steps 0..H-1, H..2H-1, ...
        return open_loop_loss(self.net, self.normalizer, inputs[:, :n * H].reshape(-1, H, inputs.shape[-1]),
                              targets[:, :n * H].reshape(-1, H, targets.shape[-1]))


class RecurrentDynamics(nn.Module):
    """ReBAL's model: a GRU reads the M past (input, normalised change) pairs into a hidden state h; an MLP
    head predicts the normalised change from (h, input).

    Args:
        in_features: model input size. out_features: observation size.
        hidden: GRU units (paper: 256). Default 256. head: hidden sizes of the head. Default (256,).
    """

    def __init__(self, in_features: int = 23, out_features: int = 18, hidden: int = 256,
                 head: tuple[int, ...] = (256,)) -> None:
        super().__init__()
        self.hidden = hidden
        self.gru = nn.GRU(in_features + out_features, hidden, batch_first=True)
        self.head = MLP(hidden + in_features, out_features, head)

    def encode(self, x: Tensor, y: Tensor) -> Tensor:
        """Hidden state ``[T, hidden]`` after reading past inputs x ``[T, M, in]`` and changes y ``[T, M, out]``."""
        return self.gru(torch.cat([x, y], dim=-1))[1][0]

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        """Predicted change ``[T, B, out]`` for inputs x ``[T, B, in]`` given hidden states h ``[T, hidden]``."""
        return self.head(torch.cat([h[:, None].expand(-1, x.shape[1], -1), x], dim=-1))


class ReBAL(SupervisedDynamics):
    """ReBAL: recurrence-based adaptive learner. Adaptation = the GRU's hidden state after the M past
    transitions; the K future predictions use it; trained end to end by backpropagation through time.

    Args:
        net: a :class:`RecurrentDynamics` (default: GRU of 256 units, as the paper).
        optimizer: default Adam (lr 1e-3).
        obs_dim, action_dim, exclude_obs_dims, aggregate_every_n_epochs: see :class:`DynamicsLearner`.
    """

    def __init__(self, net: RecurrentDynamics | None = None, obs_dim: int = 18, action_dim: int = 6,
                 exclude_obs_dims: Sequence[int] = (0,), aggregate_every_n_epochs: int = 1,
                 mpc: dict[str, Any] | None = None, optimizer: OptimizerCallable = torch.optim.Adam) -> None:
        if net is None:
            net = RecurrentDynamics(self._in_features(obs_dim, action_dim, exclude_obs_dims), obs_dim)
        if not isinstance(net, RecurrentDynamics):
            raise ValueError(f"ReBAL needs a lit_meta.rl.RecurrentDynamics net, got {type(net).__name__}")
        super().__init__(net, obs_dim, action_dim, exclude_obs_dims, aggregate_every_n_epochs, mpc, optimizer)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskParams:
        """The GRU's hidden state ``{"h": [T, hidden]}`` after reading the M past (input, change) pairs."""
        return {"h": self.net.encode(support_x, support_y)}

    def window_steps_needed(self) -> int:
        return 2  # a past window to encode and a transition to predict

    def unadapted(self, n_tasks: int) -> TaskParams:
        """Before adaptation: a zero hidden state."""
        weight = next(self.net.parameters())
        return {"h": weight.new_zeros(n_tasks, self.net.hidden)}

    def predict(self, state: TaskParams, x: Tensor) -> Tensor:
        """Predicted normalised changes ``[T, B, obs_dim]`` given the hidden states ``state["h"]``."""
        return self.net(state["h"], x)

    def training_loss(self, batch: Episode) -> Tensor:
        if not isinstance(batch, Episode):
            raise ValueError("ReBAL trains on windows: use RolloutDataModule(batch_type='windows')")
        outputs = self.predict(self.adapt(batch.support_x, batch.support_y), batch.query_x)
        return per_task_loss(mse_loss, outputs, batch.query_y).mean()
