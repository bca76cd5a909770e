"""What the lit-meta callbacks share: finding the W&B run, the one notice when media are skipped, going offline.

Scalars always go through ``pl_module.log`` (so any Lightning logger gets them); media (images, line plots,
videos, tables) need a :class:`~lightning.pytorch.loggers.WandbLogger` and are made on global rank 0 only.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import weakref
from typing import Any
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger("lit_meta.callbacks")

_noticed: "weakref.WeakSet[L.Trainer]" = weakref.WeakSet()  # trainers already told that media are skipped
_offline_said = False


def wandb_logger(trainer: L.Trainer):
    """The trainer's :class:`WandbLogger`, or None."""
    from lightning.pytorch.loggers import WandbLogger

    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


def wandb_run(trainer: L.Trainer):
    """The W&B run to log media to, on global rank 0 with a WandbLogger attached; else None (with one notice
    per trainer that media are skipped, when a logger other than W&B is attached)."""
    if not trainer.is_global_zero or trainer.sanity_checking:
        return None
    logger = wandb_logger(trainer)
    if logger is None:
        if trainer.loggers and trainer not in _noticed and not getattr(trainer, "fast_dev_run", False):
            _noticed.add(trainer)
            names = ", ".join(type(lg).__name__ for lg in trainer.loggers)
            log.info("lit_meta.callbacks: no WandbLogger (loggers: %s): scalar metrics go to these loggers, media "
                     "(images, line plots, videos, tables) are skipped", names)
        return None
    return logger.experiment


def has_api_key() -> bool:
    """A W&B API key in the environment or ~/.netrc (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def reachable(timeout: float = 2.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_offline_if_needed(check_network: bool = True) -> str | None:
    """Without an API key (or, ``check_network``, without a route to the W&B server) set ``WANDB_MODE=offline``,
    so ``wandb.init`` never prompts for a login (CI has no stdin) nor waits on the network. Leaves an explicit
    ``WANDB_MODE`` alone. Returns why it went offline, or None."""
    if os.environ.get("WANDB_MODE"):
        return None
    reason = None
    if not has_api_key():
        reason = "no W&B API key"
    elif check_network and not reachable():
        reason = "the W&B server is not reachable"
    if reason:
        os.environ["WANDB_MODE"] = "offline"
    return reason


@rank_zero_only
def say_offline(run: Any, reason: str | None) -> None:
    """Once per process: the run is offline, and how to upload it later."""
    global _offline_said
    offline = bool(getattr(run, "offline", False)) or getattr(getattr(run, "settings", None), "mode", "") == "offline"
    if _offline_said or not offline:
        return
    _offline_said = True
    where = getattr(run, "dir", None)
    where = os.path.dirname(where) if where else "<save_dir>/wandb/offline-run-*"
    log.warning("lit_meta.callbacks: W&B is offline (%s): the run is written to %s; upload it later with "
                "`wandb sync %s`", reason or "WANDB_MODE=offline or WandbLogger(offline=True)", where, where)


def log_scalars(pl_module: L.LightningModule, values: dict[str, float], batch_size: int | None = None,
                **kwargs: Any) -> None:
    """``pl_module.log`` each finite-or-not scalar (no progress bar; this process's value, no DDP sync)."""
    for key, value in values.items():
        if value is None:
            continue
        pl_module.log(key, float(value), batch_size=batch_size, **kwargs)
