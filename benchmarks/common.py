"""What every benchmark records beside its figures (machine, versions, date), and how it times a call."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def machine_line(malloc_kept: bool | None = None) -> str:
    """One line: date, CPU, cores, versions, torch threads, and (``malloc_kept`` not None) whether the script
    called :func:`lit_meta.allocator.keep_freed_memory` with success, as ``train.py`` does."""
    import lightning

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{datetime.date.today()} | {cpu} | {os.cpu_count()} cores | python {platform.python_version()} | "
            f"torch {torch.__version__} | lightning {lightning.__version__} | torch threads {torch.get_num_threads()}"
            + ("" if malloc_kept is None else f" | malloc keeps freed memory: {'yes' if malloc_kept else 'no'}"))


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def save_figure(fig, path: str | Path, what: str = "plot") -> None:
    """``fig`` laid out and written to ``path`` (its folder made), 100 dpi; prints where."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"{what}: {path}")
