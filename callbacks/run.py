"""Run-level records: config and code version in the run config, the offline notice, a final summary table."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ._common import ensure_offline_if_needed, log, say_offline, wandb_logger, wandb_run

HEADLINE = ("val/query_acc", "val/query_acc_ci95", "val/pre_query_acc", "val/query_loss", "val/pre_query_loss",
            "test/query_acc", "test/query_acc_ci95", "test/query_loss", "train/query_loss", "train/query_acc",
            "train/tasks_per_s", "train/peak_mem_mb", "rollout/test_mean_return", "rollout/test_return_ci95",
            "rollout/train_mean_return")


def code_version(path: Path | None = None) -> dict[str, Any]:
    """``git_commit`` and ``git_dirty`` of the checkout holding lit_meta (empty when not a git checkout)."""
    import lit_meta

    where = str(path or Path(lit_meta.__file__).resolve().parent)
    out: dict[str, Any] = {"lit_meta_version": getattr(lit_meta, "__version__", None)}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                    capture_output=True, text=True, timeout=5)
            out["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def cli_config(trainer: L.Trainer) -> dict[str, Any] | None:
    """The LightningCLI config of this run (from its SaveConfigCallback), as plain dicts; None outside the CLI."""
    from lightning.pytorch.cli import SaveConfigCallback

    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            import yaml

            try:
                return yaml.safe_load(callback.parser.dump(callback.config, skip_none=False, skip_check=True))
            except Exception as error:  # a config the parser cannot dump must not stop training
                log.debug("config not recorded: %s", error)
    return None


class RunSummary(Callback):
    """Records what the run is: the code version (git commit when available) and the full config in the logger's
    hyperparameters / the W&B run config; at the end of fit/test a summary table of the headline metrics
    (W&B: ``summary/headline`` table and the run summary; other loggers: one log line).

    Constructing it makes W&B offline-safe: without an API key (or a route to the server, when
    ``check_network``) it sets ``WANDB_MODE=offline`` before any run starts, so nothing waits on a login
    prompt or the network; an offline run says so once and is uploaded later with ``wandb sync``.

    Args:
        headline: metric names of the summary table (those present at the end are shown).
        check_network: probe the W&B server (2 s) when a key is present. Default True.
    """

    def __init__(self, headline: Sequence[str] = HEADLINE, check_network: bool = True) -> None:
        self.headline = list(headline)
        self._offline_reason = ensure_offline_if_needed(check_network)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        info = code_version()
        config = cli_config(trainer)
        logger = wandb_logger(trainer)
        if logger is not None:
            run = logger.experiment
            say_offline(run, self._offline_reason)
            run.config.update({**info, **({"cli": config} if config else {})}, allow_val_change=True)
        else:
            for other in trainer.loggers:
                other.log_hyperparams(info)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._summary(trainer, "fit")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._summary(trainer, "test")

    def _summary(self, trainer: L.Trainer, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        rows = [(k, float(metrics[k])) for k in self.headline if k in metrics]
        if not rows:
            return
        run = wandb_run(trainer)
        if run is not None:
            import wandb

            run.log({f"summary/{stage}": wandb.Table(columns=["metric", "value"], data=[list(r) for r in rows])})
            run.summary.update({f"final/{k}": v for k, v in rows})
        width = max(len(k) for k, _ in rows)
        log.info("lit_meta.callbacks: %s summary\n%s", stage, "\n".join(f"  {k:<{width}}  {v:.6g}" for k, v in rows))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: ``torch.cuda.max_memory_allocated`` on a GPU, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10  # bytes on macOS, KiB on Linux
