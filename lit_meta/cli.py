"""The LightningCLI of lit-meta: ``train.py`` and the ``lit-meta`` command run it.

Subclass mode for both model and data: any LightningModule / LightningDataModule, from this package
or from the user's project by import path, is chosen with ``class_path`` in the YAML config.

Every run also gets (see :mod:`lit_meta.checkpointing`): checkpoint files written atomically, a ``last.ckpt``
on SIGTERM, and the global RNG states in each checkpoint, so ``fit ... --ckpt_path last`` after a kill continues
as if the run had not stopped. Every checkpoint carries the run's identity (its resolved model/data config and
seed); before a resume the checkpoint is checked (intact, a Lightning checkpoint, parameter shapes that fit) and
compared with the config given: the config wins where compatible and the differences are listed; ``last`` refuses
a checkpoint of another run (:func:`lit_meta.checkpointing.check_resume`).
"""

from __future__ import annotations

import logging
import shlex
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI

from lit_meta.allocator import keep_freed_memory
from lit_meta.callbacks.run import HEADLINE
from lit_meta.checkpointing import (AtomicCheckpointIO, ConfigOptimizer, PreemptionCheckpoint, RNGStateCheckpoint,
                                    RunIdentity, check_resume, last_checkpoint_path)


class LitMetaCLI(LightningCLI):
    """LightningCLI whose trainer writes checkpoints atomically (unless the config chose a checkpoint plugin) and
    that checks ``--ckpt_path`` before anything starts."""

    def __init__(self, *args, **kwargs) -> None:
        given = kwargs.get("args")
        self._argv = [str(a) for a in given] if isinstance(given, (list, tuple)) else sys.argv[1:]  # for the summary
        self._held_ckpt_path: str | None = None  # --ckpt_path, held back by parse_arguments
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        """Parse as LightningCLI does, then hold ``--ckpt_path`` back until :meth:`before_instantiate_classes`:
        LightningCLI would replace the config's model arguments by the checkpoint's hyperparameters when it is a
        file (not when it is ``last``); here the config given wins in both cases, and :meth:`_check_resume`
        compares the two before anything starts."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        self._held_ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if self._held_ckpt_path is not None:
            self.config[subcommand].ckpt_path = None

    def before_instantiate_classes(self) -> None:
        if self._held_ckpt_path is not None:
            self.config[self.config["subcommand"]].ckpt_path = self._held_ckpt_path

    def _config(self) -> dict:
        subcommand = self.config.get("subcommand")
        return (self.config[subcommand] if subcommand else self.config).as_dict()

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        trainer.callbacks.append(RunIdentity(self._config()))
        return trainer

    def _check_resume(self, subcommand: str) -> None:
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path is None or "://" in str(ckpt_path) or str(ckpt_path) in ("best", "hpc", "registry"):
            return
        how = "last" if str(ckpt_path) == "last" else "file"
        path = last_checkpoint_path(self.trainer) if how == "last" else Path(ckpt_path)
        if how == "last" and not path.is_file():
            return  # Lightning says so and starts from scratch
        differences = check_resume(path, how, self.model, self._config(), self.trainer.world_size)
        if any(key.startswith("model.init_args.optimizer") for key, _, _ in differences):
            self.trainer.callbacks.append(ConfigOptimizer())

    def before_fit(self) -> None:
        self._check_resume("fit")
        if self.trainer.precision == "64-true":
            # Lightning restores a checkpoint's weights before its precision plugin converts the module: into float32
            # parameters, rounding them; converting first makes a float64 resume exact
            self.model.double()

    def before_validate(self) -> None:
        self._check_resume("validate")

    def before_test(self) -> None:
        self._check_resume("test")

    def after_fit(self) -> None:
        self._print_summary("fit")

    def after_validate(self) -> None:
        self._print_summary("validate")

    def after_test(self) -> None:
        self._print_summary("test")

    def _print_summary(self, subcommand: str) -> None:
        """What the run ended with: its headline metrics (with their 95% CIs), where the checkpoints and logs are,
        and the commands that resume and test it (printed by global rank 0; built on every rank: ``trainer.log_dir``
        is a collective under DDP)."""
        text = run_summary(self.trainer, subcommand, self._command(subcommand))
        if self.trainer.is_global_zero:
            print(text, flush=True)

    def _command(self, subcommand: str) -> list[str]:
        """This run's command line with ``subcommand`` first and without ``--ckpt_path``."""
        args, out, skip = self._argv, [], False
        for arg in args:
            if skip:
                skip = False
            elif arg == "--ckpt_path":
                skip = True
            elif not arg.startswith("--ckpt_path="):
                out.append(arg)
        return [a for a in out if a != subcommand]


def run_summary(trainer: L.Trainer, subcommand: str, args: list[str]) -> str:
    """The end-of-run summary :class:`LitMetaCLI` prints: headline metrics (``HEADLINE``, each with its ``_ci95``
    where logged), checkpoints, log folder, and the resume / test commands built from ``args``."""
    metrics = trainer.callback_metrics
    names = [k for k in HEADLINE if k in metrics and not k.endswith("_ci95")]
    names += sorted(k for k in metrics if k.startswith(("val/", "test/")) and k.endswith("query_acc") and k not in names)
    width = max([len(k) for k in names] + [10])
    lines = [f"lit-meta: {subcommand} finished after {trainer.current_epoch} epoch(s), {trainer.global_step} step(s)"]
    for key in names:
        value = float(metrics[key])
        ci = f" +- {float(metrics[key + '_ci95']):.4g} (95% CI)" if key + "_ci95" in metrics else ""
        lines.append(f"  {key:<{width}}  {value:.4g}{ci}")
    if not names:
        lines.append("  (no headline metric was logged)")
    checkpoints = [c for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
    paths = [(getattr(c, "best_model_path", "") or "", getattr(c, "last_model_path", "") or "") for c in checkpoints]
    for callback, (best, last) in zip(checkpoints, paths):
        lines.append(f"  checkpoints: {callback.dirpath}" + (f" (last: {Path(last).name})" if last else "")
                     + (f" (best: {Path(best).name})" if best and best != last else ""))
    if trainer.log_dir:
        lines.append(f"  logs:        {trainer.log_dir}")
    # joined, not str.format-ted: the user's arguments may hold braces (a JSON value such as --model.init_args.mpc)
    options = " ".join(shlex.quote(a) for a in args)
    if checkpoints and subcommand == "fit":
        lines.append(f"  resume:      python train.py fit {options} --ckpt_path last")
        best = paths[0][0] or paths[0][1]
        lines.append(f"  test:        python train.py test {options} --ckpt_path {shlex.quote(best) if best else 'last'}")
    return "\n".join(lines)


# Third-party messages a lit-meta user can do nothing about (each checked by tests/test_cli.py to be silenced, while
# other warnings still show): Lightning calling a torch API torch has deprecated; Lightning's notice that a
# LightningModule's on_after_batch_transfer wins over the DataModule's (lit-meta's learners convert batches there by
# design); Lightning's advertisement for its cloud logger.
KNOWN_NOISE = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
)


class _DropAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def quiet_known_noise() -> None:
    """Silence :data:`KNOWN_NOISE` and Lightning's litlogger tip; every other warning and log line stays."""
    for message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message)
    # the unified package's loggers and the standalone pytorch_lightning / lightning_fabric ones (both may be installed)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                 "lightning_utilities.core.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvert) for f in logger.filters):
            logger.addFilter(_DropAdvert())


def release_process_group() -> None:
    """Destroy the default process group, if any, when the run is over (``train.py`` calls it on every rank after a
    finished run or a SIGTERM stop, not after an error): each rank closes its connections itself instead of at
    interpreter exit, where gloo's teardown racing the other ranks' aborted the process now and then (SIGABRT,
    "terminate called without an active exception") after a successful run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI (``fit``, ``validate``, ``test``, ``--print_config``) on ``args`` (default: sys.argv), with
    freed memory kept in the process (:func:`lit_meta.allocator.keep_freed_memory`)."""
    keep_freed_memory()
    quiet_known_noise()
    return LitMetaCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [PreemptionCheckpoint(), RNGStateCheckpoint()]},
        args=args,
        run=run,
    )
