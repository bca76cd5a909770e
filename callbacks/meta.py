"""What a few-shot meta-learning researcher wants to see (iMAML, MAML, FOMAML, Reptile, FineTune).

The learners log the scalars themselves (``train/query_loss|acc``, ``train/pre_query_loss|acc``,
``train/pre_support_loss``, ``train/inner_loss_final``, ``train/meta_grad_norm``, ``train/cg_residual``,
``train/cg_iterations``, ``train/proximal_distance``; ``val/[pre_]query_loss|acc[_ci95]``). This callback adds
throughput and memory, ``lam``, and the media: the inner-loss curve as a W&B line plot and a grid image of
one validation episode.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lit_meta.learners import logging_this_step

from ._common import log_scalars, wandb_run
from .run import peak_memory_mb


class MetaLearningMonitor(Callback):
    """Throughput, memory and media of a few-shot learner; reads what the learner logs and keeps, never changes it.

    Scalars (every logged training step, through ``pl_module.log``, so any logger): ``train/tasks_per_s``
    (tasks of the meta-batch / wall time of the training step), ``train/peak_mem_mb``
    (``torch.cuda.max_memory_allocated`` on a GPU, peak RSS on a CPU), ``train/lam`` (iMAML).

    Media (W&B only, global rank 0, every ``media_every_n_val`` validation runs, sanity check excluded):
    ``media/inner_loss_curve``: inner (proximal) loss vs inner step, averaged over the meta-batch and the
    training steps since the last plot (a W&B line plot); ``media/val_episode``: one validation task, support
    and query images with their true label (t) and the adapted model's prediction (p), wrong predictions
    framed in red, pre/post-adaptation accuracy in the caption.

    Args:
        media_every_n_val: media every n-th validation run; 0: never. Default 1.
        max_query_images: query images shown in the episode grid. Default 25.
        image_scale: integer upscaling of each image in the grid. Default 2.
    """

    def __init__(self, media_every_n_val: int = 1, max_query_images: int = 25, image_scale: int = 2) -> None:
        if media_every_n_val < 0:
            raise ValueError(f"media_every_n_val={media_every_n_val} must be >= 0 (0: never)")
        self.media_every_n_val, self.max_query_images, self.image_scale = media_every_n_val, max_query_images, image_scale
        self._start = 0.0
        self._curve_sum: Tensor | None = None
        self._curve_n = 0
        self._val_runs = 0
        self._episode: Any = None

    # --- training: throughput, memory, the running inner-loss curve ---------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        curve = outputs.get("inner_curve") if isinstance(outputs, dict) else None  # MetaLearner.training_step's
        if curve is not None and self.media_every_n_val:
            curve = curve.detach()
            if self._curve_sum is None or self._curve_sum.shape != curve.shape:
                self._curve_sum, self._curve_n = torch.zeros_like(curve), 0
            self._curve_sum += curve
            self._curve_n += 1
        if not logging_this_step(trainer):
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # only on the logged steps
        seconds = time.perf_counter() - self._start
        n_tasks = getattr(batch, "n_tasks", None) or len(batch[0])
        values = {"train/tasks_per_s": n_tasks / max(seconds, 1e-9), "train/peak_mem_mb": peak_memory_mb(pl_module.device)}
        if hasattr(pl_module, "lam"):
            values["train/lam"] = pl_module.lam
        log_scalars(pl_module, values, batch_size=n_tasks, on_step=True, on_epoch=False)

    # --- validation: media --------------------------------------------------------------------
    def _media_due(self, trainer: L.Trainer) -> bool:
        return bool(self.media_every_n_val) and not trainer.sanity_checking and \
            (self._val_runs + 1) % self.media_every_n_val == 0

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and self._media_due(trainer) and trainer.is_global_zero:
            x = getattr(batch, "support_x", None)
            if x is not None and x.dim() == 5 and not batch.support_y.is_floating_point():  # image classification
                self._episode = tuple(t[:1].detach().clone() for t in batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        due = self._media_due(trainer)
        self._val_runs += 1
        if not due:
            return
        run = wandb_run(trainer)
        episode, self._episode = self._episode, None
        if run is None:
            return
        import wandb

        media: dict[str, Any] = {}
        if self._curve_sum is not None and self._curve_n:
            curve = (self._curve_sum / self._curve_n).cpu().tolist()
            table = wandb.Table(columns=["inner_step", "inner_loss"], data=[[i, v] for i, v in enumerate(curve)])
            media["media/inner_loss_curve"] = wandb.plot.line(
                table, "inner_step", "inner_loss",
                title=f"inner loss vs inner step (mean of {self._curve_n} training steps, step {trainer.global_step})")
            self._curve_sum, self._curve_n = None, 0
        if episode is not None:
            media["media/val_episode"] = self._episode_image(pl_module, episode)
        if media:
            run.log({**media, "trainer/global_step": trainer.global_step})

    # --- the episode grid ---------------------------------------------------------------------
    def _episode_image(self, pl_module: L.LightningModule, episode: tuple[Tensor, ...]):
        """Adapt on the task's support set (the learner's own ``adapt``/``predict``), draw the grid."""
        import wandb
        from lit_meta.episode import Episode

        with torch.inference_mode(False), torch.enable_grad():
            task = Episode(*(t.clone() for t in episode))
            pre = pl_module.predict(pl_module.unadapted(1), task.query_x).detach().argmax(-1)[0]
            phi = pl_module.adapt(task.support_x, task.support_y)
            post = pl_module.predict(phi, task.query_x).detach().argmax(-1)[0]
            support_pred = pl_module.predict(phi, task.support_x).detach().argmax(-1)[0]
        qy, sy = task.query_y[0], task.support_y[0]
        pre_acc, post_acc = float((pre == qy).float().mean()), float((post == qy).float().mean())
        n = min(self.max_query_images, len(qy))
        image = episode_grid(task.support_x[0], sy, support_pred, task.query_x[0][:n], qy[:n], post[:n],
                             scale=self.image_scale)
        caption = (f"step {pl_module.global_step}: top row support (t true, p adapted prediction), below query; red "
                   f"frame = wrong. Query acc before adaptation {pre_acc:.2f}, after {post_acc:.2f}")
        return wandb.Image(image, caption=caption)


def episode_grid(support_x: Tensor, support_y: Tensor, support_pred: Tensor, query_x: Tensor, query_y: Tensor,
                 query_pred: Tensor, scale: int = 2, columns: int | None = None):
    """A PIL image: the support images in the first row(s), the query images below; under each image
    ``t<true> p<predicted>``; a wrong prediction gets a red frame, a right one a green frame."""
    from PIL import Image, ImageDraw

    def to_pil(x: Tensor) -> Image.Image:
        x = x.detach().float().cpu()
        x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-8) if x.max() > 1 or x.min() < 0 else x
        array = (x.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")
        return img.resize((img.width * scale, img.height * scale), Image.NEAREST)

    h, w = support_x.shape[-2] * scale, support_x.shape[-1] * scale
    pad, text_h = 3, 12
    cell_w, cell_h = w + 2 * pad, h + 2 * pad + text_h
    columns = columns or max(len(support_x), min(len(query_x), 10), 1)
    rows_s = -(-len(support_x) // columns)
    rows_q = -(-len(query_x) // columns)
    canvas = Image.new("RGB", (columns * cell_w, (rows_s + rows_q) * cell_h + 6), "white")
    draw = ImageDraw.Draw(canvas)
    items = [(x, y, p, i // columns, i % columns) for i, (x, y, p) in enumerate(zip(support_x, support_y, support_pred))]
    items += [(x, y, p, rows_s + i // columns, i % columns) for i, (x, y, p) in enumerate(zip(query_x, query_y, query_pred))]
    for x, y, p, row, col in items:
        left, top = col * cell_w, row * cell_h + (6 if row >= rows_s else 0)
        wrong = int(y) != int(p)
        draw.rectangle([left, top, left + cell_w - 1, top + h + 2 * pad - 1], fill="red" if wrong else "green")
        canvas.paste(to_pil(x), (left + pad, top + pad))
        draw.text((left + pad, top + h + 2 * pad), f"t{int(y)} p{int(p)}", fill="red" if wrong else "black")
    if rows_q:
        draw.line([0, rows_s * cell_h + 2, canvas.width, rows_s * cell_h + 2], fill="black", width=2)
    return canvas
