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

import hashlib
import json
import logging
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_meta.datamodules.files import atomic_torch_save, torch_file_problem

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


#: the checkpoint key under which :class:`RunIdentity` stores what identifies the run
RUN_KEY = "lit_meta_run"


def _others_hint(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path) if path.parent.is_dir() else []
    return f"; other checkpoints in {path.parent}: {others}" if others else ""


def check_checkpoint(path: str | os.PathLike | None) -> None:
    """Before a run resumes from ``path``: refuse a missing, truncated, damaged or non-torch file with an error that
    says so and lists the other checkpoints beside it (``None``, ``"last"``, ``"best"`` and remote paths are left to
    Lightning, which resolves them; :func:`check_resume` checks the file they resolve to).

    Damage is found by the CRC-32 that ``torch.save`` writes for every member of the archive (``torch.load``
    never checks it): a checkpoint with damaged tensor bytes is refused, never trained on."""
    if path is None or str(path) in ("last", "best", "hpc", "registry") or "://" in str(path):
        return
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist{_others_hint(path)}")
    problem = torch_file_problem(path)
    if problem is not None:
        kind = "is damaged" if problem.startswith("damaged") else "is not a readable checkpoint (truncated, or not " \
            "written by torch.save / Lightning)"
        raise ValueError(f"ckpt_path={str(path)!r} {kind}: {problem}; nothing was changed: resume from another "
                         f"checkpoint{_others_hint(path)}")


def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """What identifies a run: the resolved ``model`` and ``data`` configs and ``seed_everything`` (plain
    containers, ``weights_only``-loadable), and their SHA-256 fingerprint. The trainer's settings (epochs, devices,
    loggers) are not part of it: a run may be resumed with more epochs or on other hardware."""
    identity = json.loads(json.dumps({key: config.get(key) for key in ("model", "data", "seed_everything")},
                                     sort_keys=True, default=str))
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return {"config": identity, "fingerprint": fingerprint}


class RunIdentity(Callback):
    """Writes :func:`run_identity` of the run (and its world size) into every checkpoint under ``RUN_KEY``, so
    a resume can tell whether a checkpoint belongs to the run (``train.py`` adds it; see :func:`check_resume`)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.identity = run_identity(config)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_KEY] = {**self.identity, "world_size": trainer.world_size}


def config_differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf where two nested configs differ (a missing key: None)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new), key=str)
                for d in config_differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))]
    return [] if old == new else [(prefix, old, new)]


def _shape_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = [f"{k}: {list(saved[k].shape)} (checkpoint) vs {list(current[k].shape)} (config)"
           for k in saved.keys() & current.keys() if tuple(saved[k].shape) != tuple(current[k].shape)]
    out += [f"{k}: only in the checkpoint" for k in saved.keys() - current.keys()]
    out += [f"{k}: only in the config's model" for k in current.keys() - saved.keys()]
    return sorted(out)


def check_resume(path: str | os.PathLike, how: Literal["file", "last"], model: L.LightningModule,
                 config: dict[str, Any], world_size: int = 1) -> list[tuple[str, Any, Any]]:
    """Before a run resumes from ``path``, compare the checkpoint with the run's config; returns the differences.

    One rule for both ways of resuming (``--ckpt_path FILE`` and ``--ckpt_path last``):

    - the file must be intact (CRC-32 of every member) and a Lightning checkpoint, else ``ValueError`` naming it
      and the good checkpoints beside it;
    - a change the checkpoint cannot take (parameter shapes: ``hidden``, ``n_way``/``out_features``; a changed
      ``lr_scheduler``; the optimizer under a scheduler) is refused, naming every differing key with both values;
    - a compatible change: the config given wins, and the differences are logged (key, checkpoint value, config
      value). Except with ``last``, which picks a file by folder: a ``last.ckpt`` written by a run with another
      config (e.g. a finished earlier run of the same config file, after the new run died before its first
      checkpoint) is refused; pass that file explicitly to continue it with this config.
    """
    path = Path(path)
    check_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - torch's message names no file
        raise ValueError(f"ckpt_path={str(path)!r} could not be loaded as a checkpoint ({type(error).__name__}: "
                         f"{error}){_others_hint(path)}") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"ckpt_path={str(path)!r} is a torch file but not a Lightning checkpoint (no 'state_dict'; "
                         f"found {keys}): pass a checkpoint written by train.py / Trainer.save_checkpoint"
                         f"{_others_hint(path)}")
    saved = checkpoint.get(RUN_KEY)
    current = run_identity(config)
    differences = config_differences(saved["config"], current["config"]) if saved else []
    listing = "; ".join(f"{k}: {old!r} (checkpoint) -> {new!r} (config)" for k, old, new in differences)
    shapes = _shape_differences(checkpoint["state_dict"], model.state_dict())
    scheduled = any(k.startswith("model.init_args.lr_scheduler") for k, _, _ in differences) or (
        checkpoint.get("lr_schedulers") and any(k.startswith("model.init_args.optimizer") for k, _, _ in differences))
    if shapes or scheduled:
        why = ("parameter shapes differ: " + "; ".join(shapes)) if shapes else \
            "a learning-rate scheduler's restored state cannot take a changed optimizer or scheduler"
        raise ValueError(f"cannot resume {path} with this config: {why}. Config keys that differ: "
                         f"{listing or '(the checkpoint has no run identity)'}. Change them back to the checkpoint's "
                         f"values, or start a new run (drop --ckpt_path)")
    if how == "last" and saved and differences:
        raise ValueError(
            f"--ckpt_path last found {path}, written by another run (fingerprint {saved['fingerprint']}, this config "
            f"{current['fingerprint']}): {listing}. Nothing was started. To continue that checkpoint with this "
            f"config, pass it explicitly (--ckpt_path {path}); to start a new run, drop --ckpt_path or give the run "
            f"a checkpoint folder of its own (ModelCheckpoint dirpath)")
    if saved is None:
        log.warning("%s has no run identity (written by an older lit-meta, or not by train.py): it cannot be checked "
                    "to belong to this run", path)
    elif saved.get("world_size", world_size) != world_size:
        log.warning("resuming %s on %d processes (it was written by %d): the global meta-batch and its episodes are "
                    "the same, each process takes its share", path, world_size, saved["world_size"])
    if differences:
        log.warning("resuming %s with a config that differs from the checkpoint's; the config wins: %s", path, listing)
    return differences


class ConfigOptimizer(Callback):
    """After a resume, sets the optimizers' hyperparameters (lr, betas, weight decay ...) to the config's: Lightning
    restores them from the checkpoint with the optimizer state, which would silently undo a changed learning rate.
    The optimizer's state (moments, step counts) stays the checkpoint's. ``train.py`` adds it when the config's
    optimizer differs from the checkpoint's (:func:`check_resume`)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fresh = pl_module.configure_optimizers()
        if isinstance(fresh, dict):
            fresh = fresh["optimizer"]
        fresh = list(fresh) if isinstance(fresh, (list, tuple)) else [fresh]
        for restored, new in zip(trainer.optimizers, fresh):
            for group, new_group in zip(restored.param_groups, new.param_groups):
                group.update({k: v for k, v in new_group.items() if k != "params"})


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``--ckpt_path last`` looks: ``last.ckpt`` in the ModelCheckpoint's folder (else
    ``<default_root_dir>/checkpoints``)."""
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
    return Path(folder) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"


class PreemptionCheckpoint(Callback):
    """On SIGTERM (what clusters send before preemption) save ``last.ckpt`` after the current training step on
    every rank, then stop the run cleanly (exit status 0, loggers closed). Resume with ``--ckpt_path last``.

    The signal may reach any subset of the processes: all of them (SLURM's preemption), or one node only (a
    node drained, one ``torchrun`` agent stopped). From the first training batch on, this callback's SIGTERM
    handler only sets :attr:`signal_received` on the process it reached (Lightning's own handler broadcasts from
    inside the handler, a collective the other ranks are not in: with the signal on a rank other than 0 the job
    hangs); at the end of every training step the ranks agree with one max all-reduce of that flag, and if any
    rank was signalled all of them save the same checkpoint and stop at the same step. When Lightning launched the
    local processes itself (``devices > 1`` without a cluster launcher), the signal is passed on to them, as
    Lightning does.
    """

    def __init__(self) -> None:
        self.signal_received = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its handler just before the loop starts; replace it for the training loop (Lightning's
        # teardown restores the handlers of before the run)
        self.signal_received = False
        launcher = trainer.strategy.launcher

        def flag_only(signum: int, frame: Any) -> None:
            if not self.signal_received and launcher is not None:
                launcher.kill(signum)
            self.signal_received = True

        if threading.current_thread() is threading.main_thread():  # signals are only delivered to the main thread
            signal.signal(signal.SIGTERM, flag_only)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stop = self.signal_received or trainer.received_sigterm  # the latter: a signal before the first batch
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():  # was any rank signalled?
            flag = torch.tensor([float(stop)], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank, every step
            stop = flag.item() > 0
        if not stop:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            log.warning("SIGTERM received: saved %s at step %d; the run stops now. Resume with "
                        "`train.py fit ... --ckpt_path last` (or ckpt_path=%r)", path, trainer.global_step, str(path))
        raise SIGTERMException  # a SystemExit: Lightning's own way to stop on SIGTERM (on_exception, loggers closed)


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
