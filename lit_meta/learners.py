"""LightningModules for few-shot learning.

:class:`EpisodicLearner` holds what every few-shot learner shares: an episode comes in, each task's
weights are adapted on its support set (:meth:`EpisodicLearner.adapt`), and the query loss and
accuracy of the adapted weights are measured. Subclasses differ only in how they adapt and in what
they do with a training episode (:meth:`EpisodicLearner.training_step`). Evaluation runs with
gradients on (adaptation needs them), whatever the Trainer's ``inference_mode``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from .episode import Episode, to_float
from .functional import TaskParams, inner_gd, loss_for, params_of, task_logits
from .nets import Conv4, check_functional

STAGES = ("train", "val", "test")


class EpisodicLearner(L.LightningModule):
    """Base class: adapt per task on the support set, score on the query set.

    Args:
        net: the network adapted per task; any ``nn.Module`` without running statistics.
            Default: ``Conv4(out_features=5)`` (Omniglot 5-way).
        inner_steps: gradient steps of adaptation per task. Default 10.
        inner_lr: step size of adaptation. Default 0.1.
    """

    def __init__(self, net: nn.Module | None = None, inner_steps: int = 10, inner_lr: float = 0.1) -> None:
        super().__init__()
        if inner_steps < 0:
            raise ValueError(f"inner_steps={inner_steps} must be >= 0")
        if inner_lr <= 0:
            raise ValueError(f"inner_lr={inner_lr} must be > 0")
        self.net = net if net is not None else Conv4()
        check_functional(self.net)
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr
        self.automatic_optimization = False
        self.metrics = nn.ModuleDict(
            {f"{stage}_{name}": MeanMetric() for stage in STAGES for name in ("query_loss", "query_acc")}
        )
        self._n_way: int | None = None
        self._outputs_checked = False

    # --- hooks -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self._n_way = getattr(datamodule, "n_way", None)

    def on_after_batch_transfer(self, batch: Episode, dataloader_idx: int) -> Episode:
        # Images travel as uint8 and become float on the device.
        return to_float(Episode(*batch))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # --- the algorithm ------------------------------------------------------------------------
    def adapt(self, episode: Episode) -> TaskParams:
        """Per-task weights ``[T, ...]`` adapted on ``episode``'s support sets."""
        return inner_gd(
            self.net, loss_for(episode.support_y), params_of(self.net),
            episode.support_x, episode.support_y, self.inner_steps, self.inner_lr,
        )

    def score(self, phi: TaskParams, episode: Episode, stage: str) -> Tensor:
        """Query loss of the adapted weights (mean over tasks); logs loss and accuracy for ``stage``."""
        logits = task_logits(self.net, phi, episode.query_x)
        loss_fn = loss_for(episode.query_y)
        loss = loss_fn(logits.flatten(0, 1), episode.query_y.flatten(0, 1))
        self._log_metric(stage, "query_loss", loss.detach(), episode.n_tasks)
        if not episode.query_y.is_floating_point():
            acc = (logits.argmax(-1) == episode.query_y).float().mean()
            self._log_metric(stage, "query_acc", acc, episode.n_tasks)
        return loss

    def training_step(self, batch: Episode, batch_idx: int) -> Tensor:
        self._check_outputs(batch)
        return self.score(self.adapt(batch), batch, "train")

    def validation_step(self, batch: Episode, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Episode, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    # --- helpers ------------------------------------------------------------------------------
    def _evaluate(self, batch: Episode, stage: str) -> Tensor:
        # Lightning evaluates under inference_mode; adaptation needs autograd, so leave it and copy
        # the batch out of inference mode.
        with torch.inference_mode(False), torch.enable_grad():
            episode = Episode(*(t.clone() for t in batch))
            self._check_outputs(episode)
            return self.score(self.adapt(episode), episode, stage).detach()

    def _log_metric(self, stage: str, name: str, value: Tensor, n_tasks: int) -> None:
        metric = self.metrics[f"{stage}_{name}"]
        metric.update(value, weight=n_tasks)
        self.log(f"{stage}/{name}", metric, on_step=stage == "train", on_epoch=True,
                 prog_bar=name == "query_acc", batch_size=n_tasks)

    def _check_outputs(self, episode: Episode) -> None:
        """Once per run: the network's output size must equal the data's n_way (one small forward)."""
        if self._outputs_checked or self._n_way is None or episode.support_y.is_floating_point():
            return
        outputs = self.net(episode.support_x[0]).shape[-1]
        if outputs != self._n_way:
            raise ValueError(
                f"the network outputs {outputs} classes but the episodes are {self._n_way}-way; set the net's "
                f"output size to n_way (e.g. model.init_args.net.init_args.out_features: {self._n_way})"
            )
        self._outputs_checked = True


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
                f"trainer.max_steps={self.trainer.max_steps} never ends a FineTune run: max_steps counts optimizer "
                f"steps and FineTune takes none. Bound the run with trainer.max_epochs (and the data's "
                f"steps_per_epoch) or trainer.limit_train_batches instead"
            )
