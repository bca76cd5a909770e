"""Read an offline W&B run back: the records of its ``run-*.wandb`` file (wandb 0.31 has no public reader).

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of
chunks, each ``<crc32 u32><length u16><type u8>`` + data (type 1 full, 2 first, 3 middle, 4 last; a block's
tail shorter than a chunk header is zero padding); the crc covers the type byte and the data. Each assembled
record is a ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    records, pending, i = [], b"", HEADER
    while i + HEADER <= len(data):
        left = BLOCK - i % BLOCK
        if left < HEADER:
            i += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[i:i + HEADER])
        if kind == 0 and length == 0 and crc == 0:  # zero fill at the end of a block or file
            i += left
            continue
        if i + HEADER + length > len(data):  # a chunk still being written
            break
        chunk = data[i + HEADER:i + HEADER + length]
        i += HEADER + length
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad crc at byte {i}"
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    out = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        out.append(record)
    return out


def _items(items) -> dict[str, Any]:
    """key -> decoded value; nested keys joined with '.' (metric names keep their '/')."""
    return {(item.key or ".".join(item.nested_key)): json.loads(item.value_json) for item in items}


class OfflineRun:
    """The history rows, config, summary (last update wins) and files of an offline run folder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        (self.file,) = self.dir.glob("run-*.wandb")
        self.records = read_records(self.file)
        self.history: list[dict[str, Any]] = []
        self.config: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        for record in self.records:
            kind = record.WhichOneof("record_type")
            if kind == "history":
                self.history.append(_items(record.history.item))
            elif kind == "config":
                self.config.update(_items(record.config.update))
            elif kind == "summary":
                self.summary.update(_items(record.summary.update))

    def values(self, key: str) -> list[Any]:
        return [row[key] for row in self.history if key in row]

    def keys(self) -> set[str]:
        return {k for row in self.history for k in row}


def wait_for_exit(run_dir: str | Path, timeout: float = 60.0) -> "OfflineRun":
    """The run once its file holds the exit record: ``run.finish()`` can return before wandb-core has
    written everything."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        run = OfflineRun(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in run.records) or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def offline_runs(save_dir: str | Path) -> list[Path]:
    return sorted(Path(save_dir).rglob("offline-run-*"))
