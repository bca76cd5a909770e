"""Files: where caches live, checksummed downloads, atomic writes. Shared by every DataModule."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import torch


def data_root() -> Path:
    """Where datasets are looked for by default: ``$LIT_META_DATA``, else ``~/.cache/lit_meta/data``."""
    env = os.environ.get("LIT_META_DATA")
    return Path(env).expanduser() if env else default_cache_dir() / "data"


def default_cache_dir() -> Path:
    """``$LIT_META_CACHE``, else ``$XDG_CACHE_HOME/lit_meta``, else ``~/.cache/lit_meta``."""
    env = os.environ.get("LIT_META_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lit_meta"


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str) -> Path:
    """Download ``url`` to ``dest``, verifying its MD5 before the file appears at ``dest``.

    The bytes go to a temporary file beside ``dest``; on a checksum mismatch that file is deleted
    and ``OSError`` says so. ``dest`` is only ever the complete, verified file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        got = md5sum(Path(tmp))
        if got != md5:
            raise OSError(f"checksum mismatch for {url}: md5 {got}, expected {md5}; the partial download "
                          f"was deleted. Try again, or put the file at {dest} by hand")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over ``path``: a reader
    (or a process killed at any moment) sees the old file or the new one, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_archive_members(names: list[str], archive: Path) -> None:
    """Refuse an archive with an entry that would land outside the folder it is read or extracted into
    (an absolute path, a drive, or a ``..`` component: "zip slip")."""
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or (len(parts[0]) > 1 and parts[0][1] == ":"):
            raise ValueError(f"{archive} has an unsafe entry {name!r} (absolute or with '..': it would escape the "
                             f"target folder); refusing the archive: replace it with the official file")
