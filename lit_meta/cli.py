"""The LightningCLI of lit-meta: ``train.py`` and the ``lit-meta`` command run it.

Subclass mode for both model and data: any LightningModule / LightningDataModule, from this package
or from the user's project by import path, is chosen with ``class_path`` in the YAML config.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI (``fit``, ``validate``, ``test``, ``--print_config``) on ``args`` (default: sys.argv)."""
    return LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
