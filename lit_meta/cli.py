"""The LightningCLI of lit-meta: ``train.py`` and the ``lit-meta`` command run it.

Subclass mode for both model and data: any LightningModule / LightningDataModule, from this package
or from the user's project by import path, is chosen with ``class_path`` in the YAML config.

Every run also gets (see :mod:`lit_meta.checkpointing`): checkpoint files written atomically, a ``last.ckpt``
on SIGTERM, and the global RNG states in each checkpoint, so ``fit ... --ckpt_path last`` after a kill continues
as if the run had not stopped.
"""

from __future__ import annotations

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI

from lit_meta.allocator import keep_freed_memory
from lit_meta.checkpointing import AtomicCheckpointIO, PreemptionCheckpoint, RNGStateCheckpoint, check_checkpoint


class LitMetaCLI(LightningCLI):
    """LightningCLI whose trainer writes checkpoints atomically (unless the config chose a checkpoint plugin) and
    that checks ``--ckpt_path`` before anything starts."""

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is not None:  # before Lightning reads the checkpoint's hyperparameters
            check_checkpoint(self.config[subcommand].get("ckpt_path"))

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


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
