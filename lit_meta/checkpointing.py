"""Nothing lost on a kill: atomic checkpoint writes, a checkpoint on SIGTERM, RNG states in the checkpoint.

``train.py`` uses all three (see :func:`lit_meta.cli.main`); in your own Lightning project::

    trainer = L.Trainer(plugins=[AtomicCheckpointIO()], callbacks=[PreemptionCheckpoint(), RNGStateCheckpoint(),
                        ModelCheckpoint(dirpath="ckpts", save_last=True, every_n_train_steps=500)])
    trainer.fit(model, data, ckpt_path="last")   # after a kill: continues where the last checkpoint left off

What makes a resumed run equal the uninterrupted one: the module and optimizer states and the loop counters
(Lightning), the training loader's position in the epoch (:class:`lit_meta.datamodules.EpisodeLoader`), the
DataModule's state (e.g. the replay buffer and normalisation statistics of
:class:`~lit_meta.datamodules.RolloutDataModule`), and the global RNG states (:class:`RNGStateCheckpoint`).
Everything is tensors and plain containers: checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import random
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_meta.datamodules.files import atomic_torch_save

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the destination folder, flushes it to disk, then renames it over
    the destination: a kill at any moment leaves either the previous file or the new one, never a torn one
    (Lightning's own writer stages in the system temp folder and moves across file systems by copying).
    Remote paths (``s3://`` ...) are left to Lightning."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, Path(path))


def check_checkpoint(path: str | os.PathLike | None) -> None:
    """Before a run resumes from ``path``: refuse a missing, truncated or non-torch file with an error that says
    so and lists the other checkpoints beside it (``None``, ``"last"``, ``"best"`` and remote paths are left to
    Lightning, which resolves them)."""
    if path is None or str(path) in ("last", "best", "hpc", "registry") or "://" in str(path):
        return
    path = Path(path)
    others = sorted(str(p.name) for p in path.parent.glob("*.ckpt") if p != path) if path.parent.is_dir() else []
    hint = f"; other checkpoints in {path.parent}: {others}" if others else ""
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist{hint}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a torn or foreign file is not one
        raise ValueError(f"ckpt_path={str(path)!r} is not a readable checkpoint (truncated, or not written by "
                         f"torch.save / Lightning); nothing was changed: resume from another checkpoint{hint}")


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``--ckpt_path last`` looks: ``last.ckpt`` in the ModelCheckpoint's folder (else
    ``<default_root_dir>/checkpoints``)."""
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
    return Path(folder) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"


class PreemptionCheckpoint(Callback):
    """On SIGTERM (what clusters send before preemption) save ``last.ckpt`` after the current training step, then
    let Lightning stop the run cleanly (exit status 0, loggers closed). Resume with ``--ckpt_path last``.

    Lightning notes the signal (its SIGTERM handler) and stops after the step; this callback adds the checkpoint.
    Under DDP every rank takes part in the save (Lightning broadcasts the signal), rank 0 writes.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.received_sigterm:  # Lightning raises right after this hook: one save per run
            path = last_checkpoint_path(trainer)
            trainer.save_checkpoint(path)
            if trainer.is_global_zero:
                log.warning("SIGTERM received: saved %s at step %d; the run stops now. Resume with "
                            "`train.py fit ... --ckpt_path last` (or ckpt_path=%r)", path, trainer.global_step, str(path))


class RNGStateCheckpoint(Callback):
    """Puts the global RNG states (torch CPU and CUDA, NumPy, Python ``random``) in the checkpoint and restores
    them on resume, as tensors (``weights_only``-loadable), so dropout, augmentation or any other use of the
    global generators continues the same stream after a resume. (lit-meta's own sampling uses seeded
    generators keyed by epoch and step and does not depend on this.)"""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        p = state["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
