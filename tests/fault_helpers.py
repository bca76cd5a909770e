"""Imported by the train.py subprocesses of test_fault_tolerance.py (on PYTHONPATH=tests)."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from lit_meta.checkpointing import PreemptionCheckpoint


class PauseAt(Callback):
    """At global step ``step``: write ``marker`` (and ``marker.rank{global rank}``) and wait, up to a minute, for this
    process to be signalled (the :class:`~lit_meta.checkpointing.PreemptionCheckpoint` flag; then it also writes
    ``marker.signalled.rank{global rank}``) or for a file ``marker.go`` (a rank the test does not signal).

    Returns early in both cases, so the run's own SIGTERM handling goes on from here.
    """

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        preemption = next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint))
        rank = trainer.global_rank
        for path in (self.marker, f"{self.marker}.rank{rank}"):
            Path(path).write_text(f"{trainer.global_step} {trainer.current_epoch} {batch_idx}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if preemption.signal_received:
                Path(f"{self.marker}.signalled.rank{rank}").write_text("")
                return
            if Path(f"{self.marker}.go").exists():
                return
            time.sleep(0.05)


class SaveAtEnd(Callback):
    """Saves the final state of the run to ``path`` (what the test compares)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path)
