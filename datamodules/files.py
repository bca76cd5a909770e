"""Files: where caches live, checksummed downloads, atomic writes. Shared by every DataModule."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger("lit_meta.datamodules")


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
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that :func:`atomic_torch_save` left in ``folder`` when its process was killed
    mid-write (``.NAME.PID.XXXX.tmp`` whose process PID no longer runs on this machine); returns them. A temporary
    file of a live process (another run writing now) is left alone."""
    removed = []
    for tmp in folder.glob(".*.tmp"):
        parts = tmp.name.split(".")
        pid = next((int(p) for p in reversed(parts[:-2]) if p.isdigit()), None)  # the last number before the suffix
        if pid is None or pid == os.getpid() or _process_alive(pid):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def torch_file_problem(path: Path) -> str | None:
    """What is wrong with a file written by ``torch.save``, or ``None`` when it reads back intact.

    ``torch.save`` writes a zip archive with a CRC-32 of every member (tensor bytes included), but ``torch.load``
    never checks them: a file damaged on disk loads as wrong numbers. This reads every member and compares its
    CRC-32 (~1 s per GB): a truncated or foreign file ("not a zip archive") and a damaged member are named.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        return f"not a readable torch.save archive (truncated, or another kind of file): {error}"
    except (zlib.error, ValueError) as error:  # a damaged compressed member
        return f"damaged content: {error}"
    if bad is not None:
        return f"damaged content: the bytes of {bad!r} do not match the CRC-32 written with the file"
    return None


def require_writable_cache_dir(cache_dir: Path, reason: str) -> None:
    """Create ``cache_dir`` and a temporary file in it (named as :func:`atomic_torch_save`'s, so a killed process's
    is cleaned up the same way), or raise ``PermissionError`` naming the folder and the fix.

    Called before a cache is decoded (``reason``: why it must be written), so an unwritable folder fails in a
    second instead of after minutes of decoding.
    """
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".write-test.{os.getpid()}.", suffix=".tmp", dir=cache_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(
            f"cache folder {cache_dir} cannot be written ({type(e).__name__}: {e}), and {reason}. Set cache_dir= "
            f"(config data.init_args.cache_dir) to a writable folder, or the LIT_META_CACHE environment variable "
            f"to one (the default cache_dir is a subfolder of it)") from e


def load_or_build_cache(path: Path, build: Callable[[], dict], load: bool = True,
                        problem: Callable[[dict], str | None] | None = None) -> dict | None:
    """The dict cached at ``path`` when it is intact, else ``build()``, saved at ``path`` atomically.

    Intact: every CRC-32 of the ``torch.save`` archive matches (:func:`torch_file_problem`; ``torch.load`` alone
    returns damaged bytes as wrong pixels), it loads, and ``problem(data)`` (a description, or ``None``) has no
    objection. Any other cache is logged (one warning naming file and problem) and rebuilt, never used; the folder
    is checked writable before ``build`` runs. ``load=False`` only makes sure an intact cache exists (returns
    ``None`` when it already does, without loading it).
    """
    reason = "no cache of these source files is there yet"
    if path.is_file():
        found = torch_file_problem(path)
        if found is None and not load:
            return None
        if found is None:
            try:
                data = torch.load(path, weights_only=True)
            except Exception as e:  # a foreign but well-formed archive, or an object weights_only refuses
                found = f"torch.load failed ({type(e).__name__}: {e})"
            else:
                found = problem(data) if problem else None
                if found is None:
                    return data
        log.warning("cache %s cannot be used: %s; rebuilding it from the source files", path, found)
        reason = f"the cache {path.name} there cannot be used ({found}) and must be rebuilt"
    require_writable_cache_dir(path.parent, reason)
    data = build()
    atomic_torch_save(data, path)
    return data


def check_archive_members(names: list[str], archive: Path) -> None:
    """Refuse an archive with an entry that would land outside the folder it is read or extracted into
    (an absolute path, a drive, or a ``..`` component: "zip slip")."""
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or (len(parts[0]) > 1 and parts[0][1] == ":"):
            raise ValueError(f"{archive} has an unsafe entry {name!r} (absolute or with '..': it would escape the "
                             f"target folder); refusing the archive: replace it with the official file")
