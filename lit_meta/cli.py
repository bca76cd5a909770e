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

from pathlib import Path

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI

from lit_meta.allocator import keep_freed_memory
from lit_meta.checkpointing import (AtomicCheckpointIO, ConfigOptimizer, PreemptionCheckpoint, RNGStateCheckpoint,
                                    RunIdentity, check_resume, last_checkpoint_path)


class LitMetaCLI(LightningCLI):
    """LightningCLI whose trainer writes checkpoints atomically (unless the config chose a checkpoint plugin) and
    that checks ``--ckpt_path`` before anything starts."""

    def _parse_ckpt_path(self) -> None:
        """Lightning's LightningCLI replaces the config's model arguments by the checkpoint's hyperparameters when
        ``--ckpt_path`` is a file (and not when it is ``last``): here the config given wins in both cases, and
        :meth:`_check_resume` compares the two before anything starts."""

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


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI (``fit``, ``validate``, ``test``, ``--print_config``) on ``args`` (default: sys.argv), with
    freed memory kept in the process (:func:`lit_meta.allocator.keep_freed_memory`)."""
    keep_freed_memory()
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
