"""Imported by the train.py subprocesses of test_fault_tolerance.py (on PYTHONPATH=tests)."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class PauseAt(Callback):
    """At global step ``step``: write ``marker`` and wait (up to a minute) for the test to signal this process.

    Returns early once Lightning has noted a SIGTERM, so the run's own SIGTERM handling goes on from here.
    """

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        Path(self.marker).write_text(f"{trainer.global_step} {trainer.current_epoch} {batch_idx}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not trainer.received_sigterm:
            time.sleep(0.05)


class SaveAtEnd(Callback):
    """Saves the final state of the run to ``path`` (what the test compares)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path)
