"""LightningModules for few-shot learning.

:class:`AdaptiveLearner` holds what every learner shares: an episode comes in, each task's state is adapted
on its support set (:meth:`~AdaptiveLearner.adapt`; :meth:`~AdaptiveLearner.unadapted` before), and the query
loss and accuracy are measured before and after adaptation. Evaluation runs with gradients on (adaptation needs
them), whatever the Trainer's ``inference_mode``, and reports the mean and 95% confidence interval over the
fixed evaluation episodes. :class:`EpisodicLearner` adapts by gradient steps on the task's weights; the network
runs for all tasks at once through the learner's task backend (:mod:`lit_meta.backends`), chosen once.

:class:`MetaLearner` adds the meta-update (manual optimization): a subclass turns an episode into
per-task meta-gradients (:meth:`~MetaLearner.task_meta_grads`, a :class:`MetaGradients`); the mean over tasks,
summed across DDP ranks through the strategy, becomes theta.grad, and the outer optimizer steps. iMAML, MAML,
first-order MAML and Reptile differ only in that one method.

    >>> import torch
    >>> from lit_meta import IMAML, MLP, Episode
    >>> learner = IMAML(MLP(1, 1, hidden=(16,)), lam=2.0, inner_steps=5, inner_lr=0.05, cg_steps=3)
    >>> sx, qx = torch.rand(4, 10, 1), torch.rand(4, 10, 1)              # 4 regression tasks
    >>> episode = Episode(sx, torch.sin(3 * sx), qx, torch.sin(3 * qx))
    >>> result = learner.task_meta_grads(episode)                       # per-task implicit meta-gradients
    >>> result.grads["layers.0.weight"].shape, result.inner_curve.shape
    (torch.Size([4, 16, 1]), torch.Size([6, 4]))
    >>> learner.predict(learner.adapt(sx, episode.support_y), qx).shape  # adapted predictions
    torch.Size([4, 10, 1])
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import CatMetric, MeanMetric

from .backends import BackendKind, TaskBackend, task_backend
from .episode import Episode, to_float
from .functional import (InnerObjective, Params, TaskParams, check_inner, broadcast_to_tasks, implicit_meta_grad,
                         inner_solve, loss_for, maml_meta_grads, params_of, per_task_loss)
from .nets import Conv4, check_functional

EVAL_STAGES = ("val", "test")
NanPolicy = Literal["raise", "skip"]
EvalAdaptation = Literal["as_training", "plain"]
EVAL_ADAPTATIONS = ("as_training", "plain")


class AdaptiveLearner(L.LightningModule):
    """Base class: a model adapted per task on its support set, scored on its query set before and after.

    A subclass says how a task adapts (:meth:`adapt`: the per-task state, a dict of tensors with a leading task
    dimension, e.g. adapted weights, or a recurrent model's hidden state), how the adapted model predicts
    (:meth:`predict`) and what the state is before adaptation (:meth:`unadapted`). Evaluation (validation, test)
    reports the query loss (and accuracy) with both states: mean and 95% CI over the fixed evaluation episodes.

    Args:
        net: the network; any ``nn.Module`` without running statistics. Default: ``Conv4(out_features=5)``.
        backend: how the net runs for all tasks at once (:mod:`lit_meta.backends`): ``"auto"`` (default: the
            folded backend for a :class:`~lit_meta.backends.FoldedNet` such as ``Conv4``, else ``vmap``),
            ``"vmap"`` or ``"folded"``. Chosen once, here: ``self.backend``.
    """

    def __init__(self, net: nn.Module | None = None, backend: BackendKind = "auto") -> None:
        super().__init__()
        self._save_config()
        self.net = net if net is not None else Conv4()
        check_functional(self.net)
        self.backend: TaskBackend = task_backend(self.net, backend)
        self.automatic_optimization = False
        self.train_metrics = nn.ModuleDict({name: MeanMetric() for name in ("query_loss", "query_acc")})
        # per-task values of the fixed evaluation episodes: mean and 95% CI at epoch end (gathered under DDP)
        self.eval_metrics = nn.ModuleDict({
            f"{stage}_{when}query_{what}": CatMetric(nan_strategy="disable")  # keep NaN: never hide a diverged task
            for stage in EVAL_STAGES for when in ("", "pre_") for what in ("loss", "acc")
        })
        self._n_way: int | None = None
        self._outputs_checked = False

    def _logging_this_step(self) -> bool:
        """Whether the loggers record this training step (``trainer.log_every_n_steps``); True outside a Trainer.
        Call it after the step's optimizer step (see :func:`logging_this_step`)."""
        try:
            return logging_this_step(self.trainer)
        except RuntimeError:  # not attached to a Trainer
            return True

    def _save_config(self) -> None:
        """Keep the constructor's arguments (of the most derived class) in the checkpoint.

        Built by ``train.py``, the network and optimizer are saved as their config (class_path +
        init_args), so ``Learner.load_from_checkpoint(path)`` rebuilds everything. Built in Python,
        objects are not pickled into the checkpoint (it stays ``weights_only``-loadable): pass them again,
        ``load_from_checkpoint(path, net=...)``.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        # objects (a network, an optimizer class) would be pickled: keep checkpoints weights_only-loadable
        plain = (dict, list, tuple, str, int, float, bool, type(None))
        self.remove_ignored_hparams([k for k, v in self.hparams.items() if not isinstance(v, plain)])

    # --- hooks -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self._n_way = getattr(getattr(self.trainer, "datamodule", None), "n_way", None)

    def on_after_batch_transfer(self, batch: Episode, dataloader_idx: int) -> Episode:
        # Images travel as uint8 and become float on the device.
        return to_float(Episode(*batch))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # --- adaptation ---------------------------------------------------------------------------
    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskParams:
        """The per-task state ``{name: [T, ...]}`` adapted on support sets x ``[T, B, ...]``, y ``[T, B, ...]``."""
        raise NotImplementedError

    def unadapted(self, n_tasks: int) -> TaskParams:
        """The per-task state before adaptation, for ``n_tasks`` tasks: the (meta-learned) weights, shared."""
        return broadcast_to_tasks(params_of(self.net), n_tasks)

    def predict(self, state: TaskParams, x: Tensor) -> Tensor:
        """Outputs ``[T, B, ...]`` of the per-task state (from :meth:`adapt` or :meth:`unadapted`, default: the
        weights) on x ``[T, B, ...]``."""
        return self.backend.outputs(state, x)

    def training_step(self, batch: Episode, batch_idx: int) -> Tensor:
        self._check_outputs(batch)
        phi = self.adapt(batch.support_x, batch.support_y)
        return self.log_train_metrics(self.predict(phi, batch.query_x), batch)

    def validation_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch("test")

    # --- metrics ------------------------------------------------------------------------------
    @staticmethod
    def per_task_scores(outputs: Tensor, episode: Episode) -> dict[str, Tensor]:
        """Per-task query loss ``[T]`` and, for classification, accuracy ``[T]``."""
        scores = {"loss": per_task_loss(loss_for(episode.query_y), outputs, episode.query_y).detach()}
        if not episode.query_y.is_floating_point():
            scores["acc"] = (outputs.argmax(-1) == episode.query_y).float().mean(1)
        return scores

    def log_train_metrics(self, outputs: Tensor, episode: Episode) -> Tensor:
        """Log post-adaptation query loss/accuracy of a training episode; returns the mean query loss."""
        scores = self.per_task_scores(outputs, episode)
        for what, values in scores.items():
            metric = self.train_metrics[f"query_{what}"]
            metric(values)  # forward, not update: the step value (train/query_*_step) needs its cache
            self.log(f"train/query_{what}", metric, on_step=True, on_epoch=True, prog_bar=what == "acc",
                     batch_size=episode.n_tasks)
        return scores["loss"].mean()

    def _evaluate(self, batch: Episode, stage: str) -> None:
        # Lightning evaluates under inference_mode; adaptation needs autograd, so leave it and copy
        # the batch out of inference mode.
        with torch.inference_mode(False), torch.enable_grad():
            episode = Episode(*(t.clone() for t in batch))
            self._check_outputs(episode)
            before = self.per_task_scores(self.predict(self.unadapted(episode.n_tasks), episode.query_x).detach(),
                                          episode)
            phi = self.adapt(episode.support_x, episode.support_y)
            after = self.per_task_scores(self.predict(phi, episode.query_x).detach(), episode)
        for when, scores in (("pre_", before), ("", after)):
            for what, values in scores.items():
                self.eval_metrics[f"{stage}_{when}query_{what}"].update(values)

    def _log_eval_epoch(self, stage: str) -> None:
        for name, metric in self.eval_metrics.items():
            if not name.startswith(stage) or not metric.update_called:
                continue
            values = metric.compute().flatten().float()
            key = f"{stage}/{name[len(stage) + 1:]}"
            ci95 = 1.96 * values.std() / math.sqrt(values.numel()) if values.numel() > 1 else values.new_zeros(())
            self.log(key, values.mean(), prog_bar=key == f"{stage}/query_acc", sync_dist=False)
            self.log(f"{key}_ci95", ci95, sync_dist=False)
            metric.reset()

    def _check_outputs(self, episode: Episode) -> None:
        """Once per run: the network's output size must equal the data's n_way, labels within 0..n_way-1."""
        if self._outputs_checked or episode.support_y.is_floating_point():
            return
        outputs = self.net(episode.support_x[0]).shape[-1]
        if self._n_way is not None and outputs != self._n_way:
            raise ValueError(
                f"the network outputs {outputs} classes but the episodes are {self._n_way}-way; set the net's "
                f"output size to n_way (e.g. model.init_args.net.init_args.out_features: {self._n_way})"
            )
        for name, y in (("support_y", episode.support_y), ("query_y", episode.query_y)):
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= outputs:
                raise ValueError(f"{name} has labels in [{low}, {high}] but the network has {outputs} outputs: "
                                 f"labels must be 0..n_way-1; remap them per task (0..{outputs - 1})")
        self._outputs_checked = True


class EpisodicLearner(AdaptiveLearner):
    """Base of the gradient-adapted learners: a task adapts by ``inner_steps`` of gradient descent on its support
    set (all tasks at once, :func:`~lit_meta.functional.inner_solve`; the meta-learners' own inner solves vary it).

    Args:
        net, backend: see :class:`AdaptiveLearner`. Default net: ``Conv4(out_features=5)`` (Omniglot 5-way).
        inner_steps: gradient steps of adaptation per task. Default 10.
        inner_lr: step size of adaptation. Default 0.1.
    """

    def __init__(self, net: nn.Module | None = None, inner_steps: int = 10, inner_lr: float = 0.1,
                 backend: BackendKind = "auto") -> None:
        if inner_steps < 0:
            raise ValueError(f"inner_steps={inner_steps} must be >= 0")
        if inner_lr <= 0:
            raise ValueError(f"inner_lr={inner_lr} must be > 0")
        super().__init__(net, backend)
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr

    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskParams:
        """Per-task weights ``[T, ...]`` after ``inner_steps`` GD steps on support sets x ``[T, B, ...]``, y ``[T, B]``."""
        return inner_solve(self.backend, loss_for(support_y), params_of(self.net), support_x, support_y,
                           lam=0.0, inner_steps=self.inner_steps, inner_lr=self.inner_lr)[0]


class FineTune(EpisodicLearner):
    """The fine-tune (train-from-scratch) baseline: meta-learns nothing.

    Each task gets a fresh copy of the network's initial weights, trained by ``inner_steps`` of
    gradient descent (``inner_lr``) on its support set, then scored on its query set. The weights
    are never updated, so training, validation and test all measure the same thing: what a learner
    without meta-learning achieves. All tasks of an episode are fine-tuned together (``vmap``).
    """

    def configure_optimizers(self) -> Any:
        return None  # nothing is meta-trained

    def on_fit_start(self) -> None:
        trainer = self.trainer
        if trainer.max_steps != -1 and trainer.max_epochs in (None, -1):
            raise ValueError(
                f"trainer.max_steps={trainer.max_steps} never ends a FineTune run: max_steps counts optimizer "
                f"steps and FineTune takes none. Bound the run with trainer.max_epochs (and the data's "
                f"steps_per_epoch) or trainer.limit_train_batches instead"
            )


@dataclass
class MetaGradients:
    """What :meth:`MetaLearner.task_meta_grads` returns for a meta-batch of T tasks: the per-task meta-gradients,
    the adapted query outputs, and the diagnostics an algorithm has (None where it has not; each is logged as
    ``train/<name>``, its mean over the tasks)."""

    grads: TaskParams  #: per-task meta-gradients ``[T, ...]``
    outputs: Tensor  #: post-adaptation query outputs ``[T, B, ...]``
    inner_curve: Tensor | None = None  #: ``[inner_steps + 1, T]``: the objective the inner steps descend, before each and at the end
    cg_residual: Tensor | None = None  #: ``[T]``: ||b - A g|| of the CG solve
    cg_iterations: Tensor | None = None  #: ``[T]``: iterations of the batched CG solve the task was in (chunks differ)
    cg_negative_curvature: Tensor | None = None  #: ``[T]`` bool: the CG met p^T A p <= 0
    proximal_distance: Tensor | None = None  #: ``[T]``: ||phi_i - theta||

    @property
    def n_tasks(self) -> int:
        return self.outputs.shape[0]

    @classmethod
    def cat(cls, parts: list[MetaGradients]) -> MetaGradients:
        """The results of consecutive groups of tasks as one (tasks along dim 0; the inner curve's are dim 1)."""
        def join(name: str) -> Any:
            values = [getattr(p, name) for p in parts]
            if values[0] is None:
                return None
            if name == "grads":
                return {k: torch.cat([v[k] for v in values]) for k in values[0]}
            return torch.cat(values, dim=1 if name == "inner_curve" else 0)

        return cls(**{f.name: join(f.name) for f in fields(cls)})

    def diagnostics(self) -> dict[str, Tensor]:
        """The per-task diagnostics ``[T]`` this algorithm has, by name (without ``grads``, ``outputs``, the curve)."""
        skip = ("grads", "outputs", "inner_curve")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip and getattr(self, f.name) is not None}


def logging_this_step(trainer: L.Trainer) -> bool:
    """Whether the loggers record the training step that has just taken its optimizer step (``log_every_n_steps``),
    from Lightning's public counters: the meta-learners take one optimizer step per batch, so after it
    ``global_step`` is the batch's 1-based index, the count Lightning's logging decision uses."""
    if trainer.log_every_n_steps == 0:
        return False
    return trainer.global_step % trainer.log_every_n_steps == 0 or trainer.should_stop


class MetaLearner(EpisodicLearner):
    """Base of the meta-learners: per-task meta-gradients -> mean -> outer optimizer step.

    ``training_step`` returns ``{"loss": mean query loss, "inner_curve": [inner_steps + 1] mean over the finite
    tasks, or absent}``: callbacks read it as ``outputs`` of ``on_train_batch_end``.

    Args:
        net, inner_steps, inner_lr, backend: see :class:`EpisodicLearner`.
        optimizer: the outer optimizer, given the parameters. Default ``torch.optim.Adam`` (lr 1e-3).
        lr_scheduler: optional outer LR scheduler, stepped once per meta-update. Default None.
        nan_policy: a task whose inner loss or meta-gradient is not finite: ``"raise"`` (default) stops
            with the task index and inner step; ``"skip"`` leaves it out of the meta-update and logs
            ``train/skipped_tasks``, within a bound (``max_skip_fraction``). Never a NaN meta-update.
        task_chunk_size: meta-gradients of at most this many tasks at once (the rest in turn): bounds
            peak memory for the same result. Default None: the whole (per-process) meta-batch at once.
        max_skip_fraction: under ``nan_policy="skip"``, the largest fraction of tasks (counted over all
            DDP ranks) that may be skipped over the last ``skip_window`` training steps (all the steps so
            far while fewer have run); more raises ``FloatingPointError``, before that step's meta-update.
            A step whose every task is skipped always raises (there is nothing to update with). In (0, 1];
            1 leaves only that rule. Default 0.5.
        skip_window: the number of recent training steps (meta-updates) ``max_skip_fraction`` is measured
            over, >= 1. Default 50.
    """

    def __init__(self, net: nn.Module | None = None, inner_steps: int = 10, inner_lr: float = 0.1,
                 optimizer: OptimizerCallable = torch.optim.Adam, lr_scheduler: LRSchedulerCallable | None = None,
                 nan_policy: NanPolicy = "raise", task_chunk_size: int | None = None, max_skip_fraction: float = 0.5,
                 skip_window: int = 50, backend: BackendKind = "auto") -> None:
        super().__init__(net, inner_steps, inner_lr, backend)
        if nan_policy not in ("raise", "skip"):
            raise ValueError(f"nan_policy={nan_policy!r} is not one of 'raise', 'skip'")
        if task_chunk_size is not None and task_chunk_size < 1:
            raise ValueError(f"task_chunk_size={task_chunk_size} must be >= 1 (or None for the whole meta-batch)")
        if isinstance(max_skip_fraction, bool) or not isinstance(max_skip_fraction, numbers.Real) \
                or not 0 < max_skip_fraction <= 1:
            raise ValueError(f"max_skip_fraction={max_skip_fraction!r} must be in (0, 1]: the largest fraction of "
                             f"tasks nan_policy='skip' may leave out over the last skip_window steps (default 0.5; "
                             f"1: raise only when every task of a step is skipped)")
        if isinstance(skip_window, bool) or not isinstance(skip_window, numbers.Integral) or skip_window < 1:
            raise ValueError(f"skip_window={skip_window!r} must be an int >= 1: the number of recent training steps "
                             f"max_skip_fraction is measured over (default 50)")
        self.optimizer_factory, self.lr_scheduler_factory, self.nan_policy = optimizer, lr_scheduler, nan_policy
        self.task_chunk_size = task_chunk_size
        self.max_skip_fraction, self.skip_window = float(max_skip_fraction), int(skip_window)
        # (skipped, total) tasks of the last skip_window steps, summed over the DDP ranks (nan_policy='skip')
        self._skip_counts: deque[tuple[float, float]] = deque(maxlen=self.skip_window)
        self._last_finite: tuple[Tensor, Tensor | None] | None = None  # this step's finite mask and inner curve

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.net.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def task_meta_grads(self, episode: Episode) -> MetaGradients:
        """Per-task meta-gradients ``[T, ...]``, post-adaptation query outputs ``[T, B, ...]`` and the algorithm's
        diagnostics, as a :class:`MetaGradients`."""
        raise NotImplementedError

    def meta_grad_sum(self, episode: Episode) -> tuple[Params, Tensor, MetaGradients]:
        """Sum over this rank's finite tasks of the meta-gradients, the finite mask ``[T]``, and the
        :meth:`task_meta_grads` result."""
        result = self._chunked_task_meta_grads(episode)
        finite = self._finite_tasks(list(result.grads.values()), result.inner_curve)
        # where, not multiply: 0 * NaN is NaN
        return {k: torch.where(finite.view(-1, *[1] * (g.dim() - 1)), g, 0.0).sum(0) for k, g in result.grads.items()}, \
            finite, result

    def _chunked_task_meta_grads(self, episode: Episode) -> MetaGradients:
        """:meth:`task_meta_grads` over groups of at most ``task_chunk_size`` tasks (bounds peak memory)."""
        size = self.task_chunk_size or episode.n_tasks
        if size >= episode.n_tasks:
            return self.task_meta_grads(episode)
        return MetaGradients.cat([self.task_meta_grads(Episode(*(t[i:i + size] for t in episode)))
                                  for i in range(0, episode.n_tasks, size)])

    def training_step(self, batch: Episode, batch_idx: int) -> dict[str, Tensor]:
        self._check_outputs(batch)
        grad_sum, finite, result = self.meta_grad_sum(batch)
        grad_norm = self.meta_update(grad_sum, finite)
        loss = self.log_train_metrics(result.outputs.detach(), batch)
        self.log("train/meta_grad_norm", grad_norm, batch_size=batch.n_tasks)
        out = {"loss": loss}
        if result.inner_curve is not None:
            curve = result.inner_curve.detach()
            self.log("train/inner_loss_final", curve[-1].mean(), batch_size=batch.n_tasks)
            # before any step phi = theta: the proximal term is 0, this is the support loss before adaptation
            self.log("train/pre_support_loss", curve[0].mean(), batch_size=batch.n_tasks)
            out["inner_curve"] = curve[:, finite].mean(-1)  # [steps + 1], for callbacks (finite tasks)
        # cg_negative_curvature: the fraction of this step's tasks whose CG met p^T A p <= 0 (IMAML)
        for key, values in result.diagnostics().items():
            self.log(f"train/{key}", values.float().mean(), batch_size=batch.n_tasks)
        if self._logging_this_step():  # an extra forward pass: only on the steps the logger records
            with torch.no_grad():
                before = self.per_task_scores(self.predict(self.unadapted(batch.n_tasks), batch.query_x), batch)
            for what, values in before.items():
                self.log(f"train/pre_query_{what}", values.mean(), on_step=True, on_epoch=False,
                         batch_size=batch.n_tasks)
        if self.nan_policy == "skip":
            self.log("train/skipped_tasks", (~finite).sum().float(), reduce_fx="sum", batch_size=batch.n_tasks)
        return out

    def meta_update(self, grad_sum: Params, finite: Tensor) -> Tensor:
        """theta.grad = mean over this step's finite tasks of ALL ranks, then one outer optimizer step; returns
        ||theta.grad||.

        The per-rank sums and task counts (finite, all) travel in one flat tensor through the strategy's
        all-reduce, so every DDP rank applies the same update (assigning ``p.grad`` alone would bypass DDP)
        and, under ``nan_policy="skip"``, takes the same decision on the skipped tasks (:meth:`_check_skipped`).
        """
        names = list(grad_sum)
        dtype = grad_sum[names[0]].dtype
        counts = torch.stack([finite.sum(), torch.tensor(finite.numel(), device=finite.device)]).to(dtype)
        flat = torch.cat([grad_sum[k].flatten() for k in names] + [counts])
        flat = self.trainer.strategy.reduce(flat, reduce_op="sum")
        if self.nan_policy == "skip":
            self._check_skipped(flat[-2:])
        elif bool(flat[-2] < flat[-1]):  # every rank raises (a rank raising alone leaves the others waiting)
            raise FloatingPointError(self._nan_error() or (
                f"a task on another DDP rank has a non-finite inner loss or meta-gradient (that rank's error names "
                f"the task and inner step): lower inner_lr (now {self.inner_lr}) or the outer learning rate, or set "
                f"nan_policy='skip' to leave such tasks out of the meta-update"))
        count = flat[-2].clamp(min=1.0)
        # theta.grad = 1/|B| sum_{i in B} g_i, then the outer optimizer's step   (iMAML Alg. 2; the released code too)
        grad_norm = torch.linalg.vector_norm(flat[:-2]).detach() / count  # ||theta.grad||
        optimizer = self.optimizers()
        optimizer.zero_grad()
        params = dict(self.net.named_parameters())
        for chunk, name in zip(torch.split(flat[:-2], [grad_sum[k].numel() for k in names]), names):
            params[name].grad = (chunk / count).view_as(params[name]).to(params[name].dtype)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return grad_norm

    def _nan_error(self) -> str | None:
        """The error naming this rank's first non-finite task and inner step (None: this rank's are finite)."""
        finite, curve = self._last_finite
        if bool(finite.all()):
            return None
        task = int((~finite).nonzero()[0])
        where = ""
        if curve is not None and not bool(curve[:, task].isfinite().all()):
            step = int((~curve[:, task].isfinite()).nonzero()[0])
            where = f" at inner step {step} (inner loss {curve[step, task].item()})"
        return (f"task {task} of this meta-batch has a non-finite inner loss or meta-gradient{where}: lower inner_lr "
                f"(now {self.inner_lr}) or the outer learning rate, or set nan_policy='skip' to leave such tasks out "
                f"of the meta-update")

    def _check_skipped(self, counts: Tensor) -> None:
        """The bound of ``nan_policy="skip"``: raise ``FloatingPointError`` if every task of this step, or more
        than ``max_skip_fraction`` of the tasks of the last ``skip_window`` steps, were skipped.

        ``counts``: ``[2]`` finite and all tasks of this step, summed over the DDP ranks (the all-reduced tail
        of :meth:`meta_update`'s flat tensor): every rank sees the same numbers and stops together, before the
        meta-update.
        """
        finite, total = counts.tolist()
        skipped = total - finite
        where = f"training step at global step {self.global_step} (epoch {self.current_epoch})"
        fix = (f"lower inner_lr (now {self.inner_lr}) or the outer learning rate; nan_policy='raise' stops at the "
               f"first bad task and names it and its inner step")
        if total > 0 and finite == 0:
            raise FloatingPointError(
                f"non-finite inner loss or meta-gradient in every task ({int(skipped)} of {int(total)}, all ranks) "
                f"of the {where}: nan_policy='skip' left them all out, so there is no meta-update to make. "
                f"To fix: {fix}"
            )
        self._skip_counts.append((skipped, total))
        window_skipped = sum(s for s, _ in self._skip_counts)
        window_total = sum(t for _, t in self._skip_counts)
        if window_skipped > self.max_skip_fraction * window_total:
            n = len(self._skip_counts)
            raise FloatingPointError(
                f"{int(window_skipped)} of {int(window_total)} tasks ({window_skipped / window_total:.0%}) of the last "
                f"{n} training step{'s' if n > 1 else ''} (up to the {where}, all ranks) had a non-finite inner loss "
                f"or meta-gradient and were skipped: more than max_skip_fraction={self.max_skip_fraction} (over "
                f"skip_window={self.skip_window} steps), the meta-gradient comes from too few tasks. To fix: {fix}; "
                f"or, knowingly, raise max_skip_fraction"
            )

    def _finite_tasks(self, per_task: list[Tensor], curve: Tensor | None) -> Tensor:
        """``[T]`` bool: every per-task tensor (leading dim T) and the inner-loss curve ``[steps + 1, T]``
        are finite for the task. Under nan_policy='raise', :meth:`meta_update` raises on every rank once the
        all-reduced counts show a bad task anywhere, naming this rank's first (:meth:`_nan_error`)."""
        finite = torch.stack([t.reshape(t.shape[0], -1).isfinite().all(1) for t in per_task]).all(0)
        if curve is not None:
            finite = finite & curve.isfinite().all(0)
        self._last_finite = (finite, curve)  # read by _nan_error only when a step has a bad task: no sync here
        return finite


class IMAML(MetaLearner):
    """iMAML (Rajeswaran et al. 2019): proximal inner solve + implicit meta-gradient by CG.

    Per task i: phi_i ~ argmin L_i^train(phi) + lam/2 ||phi - theta||^2 (``inner_solver``), then
    g_i solves (I + H_i/lam) g_i = grad L_i^test(phi_i) by ``cg_steps`` of conjugate gradient with
    Hessian-vector products; theta.grad = mean_i g_i. Memory does not grow with ``inner_steps``.

    The authors' released code (aravindr93/imaml_dev: ``examples/omniglot_implicit_maml.py``,
    ``implicit_maml/learner_model.py``, ``implicit_maml/utils.py``, ``examples/measure_accuracy.py``) runs another
    recipe; ``inner_objective="plain_then_pullback", regu_coef=1.0, lam_damping=10.0, eval_adaptation="plain"``
    (and outer ``Adam(lr=1e-3, eps=1e-3)``) is it (``configs/imaml_omniglot_5w1s_released.yaml``):

    - per task, ``inner_steps`` SGD steps of ``inner_lr`` on the support loss alone (``Learner.learn_task``,
      no regularisation), then ONE step of the same SGD optimizer (step ``inner_lr``) on lam/2 ||phi - theta||^2
      (``regularization_loss``): the "pull-back", once, after all inner steps;
    - right-hand side: the query-loss gradient at that pulled-back phi; matrix: the support-loss Hessian there;
      CG (``utils.cg_solve``, from x = 0, ``cg_steps`` iterations, 5 in its README's command, stopping early
      only when r^T r < 1e-10, absolute) on ``Learner.matrix_evaluator``: (1 + regu_coef) v + H v / (lam +
      lam_damping) with ``regu_coef = --cg_damping = 1.0`` and ``lam_damping = 10.0`` (its default, never
      passed); ``--cg_steps <= 1`` skips CG (the meta-gradient is the query gradient; here ``cg_steps=1`` is
      one CG step);
    - meta-gradient: the mean over the meta-batch (``meta_grad += task_outer_grad / task_mb_size``), one
      ``outer_opt`` step: ``torch.optim.Adam(lr=outer_lr, eps=1e-3)`` (README: ``--outer_lr 1e-3``, meta-batch 32,
      lam 2, 16 steps of ``--inner_lr 1e-1``);
    - test (``measure_accuracy.py --lam 0.0 --n_steps 16 --inner_lr 1e-1``): 16 plain SGD steps, no proximal
      term and no pull-back.

    Args:
        net: see :class:`EpisodicLearner`. Default ``Conv4(out_features=5)``.
        lam: proximal regularisation strength lambda (paper: 2.0 on Omniglot). Default 2.0.
        inner_steps: inner-solver steps (paper: 16 for 5-way, 25 for 20-way Omniglot). Default 16.
        inner_lr: inner step size (unused by ``hessian_free``). Default 0.1.
        inner_solver: ``"gd"``, ``"adam"`` or ``"hessian_free"`` (Newton-CG, iMAML-HF). Default ``"gd"``.
        cg_steps: conjugate-gradient iterations of the meta-gradient solve (paper: 5). Default 5.
        cg_tol: CG stops early when every task's residual is <= cg_tol * ||grad L^test||. Default 1e-10.
        optimizer, lr_scheduler, nan_policy, task_chunk_size, max_skip_fraction, skip_window, backend: see
            :class:`MetaLearner` (outer Adam 1e-3 as the paper).
        inner_objective: what the inner steps descend. ``"proximal"`` (default, the paper's Eq. 4):
            L_i(phi) + lam/2 ||phi - theta||^2 in every step. ``"plain_then_pullback"`` (the released code; needs
            ``inner_solver="gd"`` and ``inner_lr * lam < 1``): L_i(phi) alone, then one step
            phi <- phi - inner_lr lam (phi - theta), which keeps the fraction 1 - inner_lr lam of the adaptation.
        regu_coef: added to the identity of the CG system, dimensionless, >= 0. Default 0.0 (the paper).
        lam_damping: added to lam where the system divides the Hessian by it, in the units of lam, >= 0.
            Default 0.0 (the paper). The system is ((1 + regu_coef) I + H_i/(lam + lam_damping)) g_i =
            grad L_i^test(phi_i); the defaults give the paper's (I + H_i/lam) g_i = grad L_i^test(phi_i), the
            released code's 1.0 and 10.0 a damped one (close to grad/2 at lam 2). Whatever the system, a task
            whose CG meets non-positive curvature (the paper's system is indefinite where H_i has an eigenvalue
            below -lam, as our ``cg_fidelity`` benchmark found at lam <= 2) is counted: ``train/cg_negative_curvature``
            logs the fraction of each meta-batch's tasks, and the first occurrence warns.
        eval_adaptation: how :meth:`adapt` adapts outside meta-training (validation, test, the monitor
            callback's episode grid; :class:`~lit_meta.rl.learners.ImplicitGrBAL`: also the MPC controller).
            ``"as_training"`` (default): the meta-training inner solve (``inner_objective``, ``inner_solver``,
            lam). ``"plain"``: ``inner_steps`` plain GD steps of ``inner_lr`` on the support loss, no proximal
            term and no pull-back (the released ``measure_accuracy.py --lam 0``).
    """

    def __init__(self, net: nn.Module | None = None, lam: float = 2.0, inner_steps: int = 16, inner_lr: float = 0.1,
                 inner_solver: Literal["gd", "adam", "hessian_free"] = "gd", cg_steps: int = 5, cg_tol: float = 1e-10,
                 optimizer: OptimizerCallable = torch.optim.Adam, lr_scheduler: LRSchedulerCallable | None = None,
                 nan_policy: NanPolicy = "raise", task_chunk_size: int | None = None, max_skip_fraction: float = 0.5,
                 skip_window: int = 50, inner_objective: InnerObjective = "proximal", regu_coef: float = 0.0,
                 lam_damping: float = 0.0, eval_adaptation: EvalAdaptation = "as_training",
                 backend: BackendKind = "auto") -> None:
        super().__init__(net, inner_steps, inner_lr, optimizer, lr_scheduler, nan_policy, task_chunk_size,
                         max_skip_fraction=max_skip_fraction, skip_window=skip_window, backend=backend)
        if not lam > 0:
            raise ValueError(f"lam={lam} must be > 0 (the proximal term lam/2 ||phi - theta||^2 anchors phi to theta)")
        if cg_steps < 1:
            raise ValueError(f"cg_steps={cg_steps} must be >= 1")
        check_inner(inner_solver, inner_objective)  # here too, so a bad config fails at construction
        if inner_objective == "plain_then_pullback" and not inner_lr * lam < 1:
            raise ValueError(f"inner_objective='plain_then_pullback' with inner_lr * lam = {inner_lr * lam:g} "
                             f"(inner_lr={inner_lr}, lam={lam}): the pull-back phi <- phi - inner_lr lam "
                             f"(phi - theta) keeps the fraction 1 - inner_lr lam of the adaptation, so it needs "
                             f"inner_lr * lam < 1 (the released recipe: 0.1 * 2 = 0.2)")
        for name, value in (("regu_coef", regu_coef), ("lam_damping", lam_damping)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
                raise ValueError(f"{name}={value!r} must be a finite number >= 0: the CG system is ((1 + regu_coef) I "
                                 f"+ H/(lam + lam_damping)) g = grad L^test; 0 and 0 give the paper's (I + H/lam), "
                                 f"the released code's 1.0 and 10.0 a damped one")
        if eval_adaptation not in EVAL_ADAPTATIONS:
            raise ValueError(f"eval_adaptation={eval_adaptation!r} is not one of {EVAL_ADAPTATIONS}")
        self.lam, self.inner_solver, self.cg_steps, self.cg_tol = lam, inner_solver, cg_steps, cg_tol
        self.inner_objective, self.eval_adaptation = inner_objective, eval_adaptation
        self.regu_coef, self.lam_damping = float(regu_coef), float(lam_damping)
        self._warned_negative_curvature = False

    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskParams:
        if self.eval_adaptation == "plain":  # the released measure_accuracy.py --lam 0: plain GD, no pull-back
            return super().adapt(support_x, support_y)
        return self._inner(support_x, support_y)[0]

    def _inner(self, support_x: Tensor, support_y: Tensor) -> tuple[TaskParams, Tensor]:
        return inner_solve(self.backend, loss_for(support_y), params_of(self.net), support_x, support_y, lam=self.lam,
                           inner_steps=self.inner_steps, inner_lr=self.inner_lr, solver=self.inner_solver,
                           cg_steps=self.cg_steps, objective=self.inner_objective)

    def task_meta_grads(self, episode: Episode) -> MetaGradients:
        loss_fn = loss_for(episode.query_y)
        phi, curve = self._inner(episode.support_x, episode.support_y)  # Eq. 4 (released: plain steps + pull-back)
        query_grad, _, outputs = self.backend.grads_and_outputs(loss_fn, phi, episode.query_x, episode.query_y)
        solved = implicit_meta_grad(self.backend, loss_fn, phi, (episode.support_x, episode.support_y), query_grad,
                                    lam=self.lam, cg_steps=self.cg_steps, cg_tol=self.cg_tol,
                                    regu_coef=self.regu_coef, lam_damping=self.lam_damping)  # Eq. 6-7
        self._warn_negative_curvature(solved.negative_curvature)
        return MetaGradients(solved.x, outputs, inner_curve=curve, cg_residual=solved.residual,
                             cg_iterations=torch.full_like(solved.residual, solved.iterations),
                             cg_negative_curvature=solved.negative_curvature,
                             proximal_distance=_distance(phi, params_of(self.net)))

    def _warn_negative_curvature(self, negative: Tensor) -> None:
        """Warn once per run, the first time a task's CG system is not positive definite (also logged per step)."""
        if self._warned_negative_curvature or not bool(negative.any()):
            return
        self._warned_negative_curvature = True
        system = ("(I + H/lam)" if self.regu_coef == 0 and self.lam_damping == 0 else
                  f"({1 + self.regu_coef:g} I + H/{self.lam + self.lam_damping:g})")
        margin = (1 + self.regu_coef) * (self.lam + self.lam_damping)
        rank_zero_warn(
            f"{int(negative.sum())} of {negative.numel()} tasks met non-positive curvature in the CG solve of the "
            f"implicit meta-gradient: the system {system} is not positive definite at their inner solution (H has "
            f"an eigenvalue below -{margin:g}), so their meta-gradient is the CG iterate where it stopped, not the "
            f"implicit gradient. train/cg_negative_curvature logs the fraction of tasks per step (this warning comes "
            f"once). A larger lam, or lam_damping / regu_coef (the released recipe's damped system), widen the margin")


class MAML(MetaLearner):
    """MAML (Finn et al. 2017): differentiate the query loss through ``inner_steps`` of SGD.

    ``first_order=True`` is FOMAML (inner gradients treated as constants). Memory grows linearly
    with ``inner_steps`` in the second-order case (the unrolled graph is kept).

    Args: see :class:`MetaLearner`; ``first_order``: FOMAML. Default False.
    """

    def __init__(self, net: nn.Module | None = None, inner_steps: int = 5, inner_lr: float = 0.4,
                 first_order: bool = False, optimizer: OptimizerCallable = torch.optim.Adam,
                 lr_scheduler: LRSchedulerCallable | None = None, nan_policy: NanPolicy = "raise",
                 task_chunk_size: int | None = None, max_skip_fraction: float = 0.5, skip_window: int = 50,
                 backend: BackendKind = "auto") -> None:
        super().__init__(net, inner_steps, inner_lr, optimizer, lr_scheduler, nan_policy, task_chunk_size,
                         max_skip_fraction=max_skip_fraction, skip_window=skip_window, backend=backend)
        self.first_order = first_order

    def task_meta_grads(self, episode: Episode) -> MetaGradients:
        loss_fn = loss_for(episode.query_y)
        theta = params_of(self.net)
        if self.first_order:  # g_i = grad L_i^test(phi_i): no graph through the inner loop
            phi = inner_solve(self.backend, loss_fn, theta, episode.support_x, episode.support_y, lam=0.0,
                              inner_steps=self.inner_steps, inner_lr=self.inner_lr)[0]
            grads, _, outputs = self.backend.grads_and_outputs(loss_fn, phi, episode.query_x, episode.query_y)
            return MetaGradients(grads, outputs)
        grads, _, outputs = maml_meta_grads(self.backend, loss_fn, theta, (episode.support_x, episode.support_y),
                                            (episode.query_x, episode.query_y), self.inner_steps, self.inner_lr)
        return MetaGradients(grads, outputs)


class Reptile(MetaLearner):
    """Reptile (Nichol et al. 2018): theta <- theta + eps * mean_i (phi_i - theta).

    phi_i: ``inner_steps`` of SGD (``inner_lr``) on task i. The meta-gradient handed to the outer
    optimizer is theta - phi_i, so outer SGD with lr eps is exactly Reptile (Adam also works).
    """

    def __init__(self, net: nn.Module | None = None, inner_steps: int = 10, inner_lr: float = 0.1,
                 optimizer: OptimizerCallable = torch.optim.Adam, lr_scheduler: LRSchedulerCallable | None = None,
                 nan_policy: NanPolicy = "raise", task_chunk_size: int | None = None, max_skip_fraction: float = 0.5,
                 skip_window: int = 50, backend: BackendKind = "auto") -> None:
        super().__init__(net, inner_steps, inner_lr, optimizer, lr_scheduler, nan_policy, task_chunk_size,
                         max_skip_fraction=max_skip_fraction, skip_window=skip_window, backend=backend)

    def task_meta_grads(self, episode: Episode) -> MetaGradients:
        theta = params_of(self.net)
        phi, curve = inner_solve(self.backend, loss_for(episode.support_y), theta, episode.support_x, episode.support_y,
                                 lam=0.0, inner_steps=self.inner_steps, inner_lr=self.inner_lr)
        grads = {k: theta[k].detach() - phi[k] for k in phi}
        return MetaGradients(grads, self.predict(phi, episode.query_x).detach(), inner_curve=curve,
                             proximal_distance=_distance(phi, theta))


def _distance(phi: TaskParams, theta: Params) -> Tensor:
    """Per-task ``||phi_i - theta||`` over all parameters, ``[T]``."""
    return torch.stack([(phi[k].detach() - theta[k].detach()).flatten(1).pow(2).sum(1) for k in phi]).sum(0).sqrt()
