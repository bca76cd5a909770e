"""Decoded-image caches (Omniglot, Mini-ImageNet): a damaged cache is rebuilt, never used; a cache folder that
cannot be written fails before decoding and says how to fix it; a valid cache in a read-only folder just loads."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from test_miniimagenet import SIZE, make_dm, write_csv_layout, write_pickle_layout

import lit_meta.datamodules.miniimagenet as mini
from lit_meta.datamodules import OmniglotDataModule
from lit_meta.datamodules import omniglot as omni
from lit_meta.datamodules.files import torch_file_problem

FIX = r"cache_dir=.*data\.init_args\.cache_dir.*LIT_META_CACHE"


# ----------------------------------------------------------------------------- helpers

def flip_tensor_bytes(path: Path, count: int = 16) -> None:
    """Invert ``count`` bytes in the middle of the largest tensor member of a ``torch.save`` file: the archive
    stays well-formed (``torch.load`` reads it), only the CRC-32 of that member no longer matches."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)  # the local file header
    middle = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[middle:middle + count] = bytes(b ^ 0xFF for b in raw[middle:middle + count])
    path.write_bytes(raw)


def damage(path: Path, how: str) -> None:
    """Damage a cache file: ``flip`` (bytes inside the tensor data), ``truncate`` (first half) or ``garbage``."""
    if how == "flip":
        flip_tensor_bytes(path)
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"garbage")


def unwritable_cache_dir(how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         existing: Path | None = None) -> Path:
    """A cache folder nothing can be written to, made in one of three ways:

    ``under_a_file``: its parent is a regular file, so it cannot be created (works as root too).
    ``chmod``: a folder made read-only by chmod (skipped as root, where chmod does not stop writes).
    ``denied``: every temporary file fails with EACCES, as on a read-only mount (works as root too).
    ``existing``: use (and keep) this folder instead of a new one (not for ``under_a_file``).
    """
    if how == "under_a_file":
        (tmp_path / "a-file").write_text("not a folder")
        return tmp_path / "a-file" / "cache"
    folder = existing or tmp_path / "read-only"
    folder.mkdir(parents=True, exist_ok=True)
    if how == "chmod":
        folder.chmod(0o555)  # made writable again by _writable_again
        try:
            probe = folder / ".probe"
            probe.write_bytes(b"")
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("running as root: chmod does not stop writes; the 'under_a_file'/'denied' variants cover this")
        return folder

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(kwargs.get("dir", folder)))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    return folder


def no_decode(*args, **kwargs):
    raise AssertionError("decoded although the cache folder cannot be written (or the cache was valid)")


@pytest.fixture(autouse=True)
def _writable_again(tmp_path):
    """Undo chmod on the way out, so pytest can delete tmp_path."""
    yield
    for root, dirs, _ in os.walk(tmp_path):
        for d in dirs:
            os.chmod(Path(root) / d, 0o755)


# ----------------------------------------------------------------------------- Omniglot

@pytest.fixture(scope="module")
def omniglot_cache(omniglot_dir, tmp_path_factory) -> tuple[list[Path], Path, torch.Tensor]:
    """The minimal zips, an intact cache built from them, and the freshly decoded images."""
    folder = tmp_path_factory.mktemp("pristine")
    zips = omni.find_zips(omniglot_dir, "minimal")
    fresh = omni.cached_decode(zips, 28, folder)["images"]
    (path,) = folder.glob("omniglot-28px-*.pt")
    return zips, path, fresh


def _copy_cache(omniglot_cache, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(omniglot_cache[1], folder / omniglot_cache[1].name))


@pytest.mark.parametrize("how", ["flip", "truncate", "garbage"])
def test_omniglot_damaged_cache_is_rebuilt_not_used(omniglot_cache, tmp_path, caplog, how):
    zips, _, fresh = omniglot_cache
    path = _copy_cache(omniglot_cache, tmp_path / "cache")
    damage(path, how)
    assert torch_file_problem(path) is not None
    if how == "flip":  # torch.load alone returns the damaged pixels without a word
        assert not torch.equal(torch.load(path, weights_only=True)["images"], fresh)
    with caplog.at_level(logging.WARNING):
        data = omni.cached_decode(zips, 28, tmp_path / "cache")
    assert torch.equal(data["images"], fresh)
    assert torch_file_problem(path) is None and torch.equal(torch.load(path, weights_only=True)["images"], fresh)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "rebuil" in warnings[0], warnings


def test_omniglot_datamodule_never_serves_damaged_pixels(omniglot_cache, omniglot_dir, tmp_path):
    reference = OmniglotDataModule(data_dir=str(omniglot_dir), variant="minimal", cache_dir=str(tmp_path / "ref"))
    _copy_cache(omniglot_cache, tmp_path / "ref")
    reference.setup()
    path = _copy_cache(omniglot_cache, tmp_path / "cache")
    flip_tensor_bytes(path)
    dm = OmniglotDataModule(data_dir=str(omniglot_dir), variant="minimal", cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup()
    assert all(torch.equal(dm.split_images[s], reference.split_images[s]) for s in reference.split_images)


@pytest.mark.parametrize("how", ["under_a_file", "chmod", "denied"])
def test_omniglot_unwritable_cache_dir_fails_before_decoding(omniglot_dir, tmp_path, monkeypatch, how):
    cache = unwritable_cache_dir(how, tmp_path, monkeypatch)
    monkeypatch.setattr(omni, "decode_zips", no_decode)
    dm = OmniglotDataModule(data_dir=str(omniglot_dir), variant="minimal", cache_dir=str(cache))
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(PermissionError, match=rf"cache folder {re.escape(str(cache))} cannot be written.*{FIX}"):
            step()


@pytest.mark.parametrize("how", ["chmod", "denied"])
def test_omniglot_valid_cache_in_read_only_dir_loads(omniglot_cache, omniglot_dir, tmp_path, monkeypatch, how):
    _copy_cache(omniglot_cache, tmp_path / "cache")
    cache = unwritable_cache_dir(how, tmp_path, monkeypatch, existing=tmp_path / "cache")
    monkeypatch.setattr(omni, "decode_zips", no_decode)
    dm = OmniglotDataModule(data_dir=str(omniglot_dir), variant="minimal", cache_dir=str(cache))
    dm.prepare_data()
    dm.setup()
    assert sum(len(c) for c in dm.split_characters.values()) == 242


def test_omniglot_damaged_cache_in_read_only_dir_says_both(omniglot_cache, omniglot_dir, tmp_path, monkeypatch):
    path = _copy_cache(omniglot_cache, tmp_path / "cache")
    flip_tensor_bytes(path)
    cache = unwritable_cache_dir("denied", tmp_path, monkeypatch, existing=tmp_path / "cache")
    monkeypatch.setattr(omni, "decode_zips", no_decode)
    dm = OmniglotDataModule(data_dir=str(omniglot_dir), variant="minimal", cache_dir=str(cache))
    message = rf"cache folder {re.escape(str(cache))} cannot be written.*{re.escape(path.name)} there cannot be used"
    with pytest.raises(PermissionError, match=rf"{message}.*{FIX}"):
        dm.setup()


# ----------------------------------------------------------------------------- Mini-ImageNet

@pytest.fixture(params=["csv", "pickle"])
def mini_root(request, tmp_path) -> Path:
    writer = write_csv_layout if request.param == "csv" else write_pickle_layout
    return writer(tmp_path / "data")


def test_miniimagenet_damaged_cache_is_rebuilt_not_used(mini_root, tmp_path, caplog):
    reference = make_dm(mini_root, tmp_path, cache_dir=str(tmp_path / "ref"))
    reference.setup()
    make_dm(mini_root, tmp_path).prepare_data()
    files = sorted((tmp_path / "cache").glob("miniimagenet-*.pt"))
    assert len(files) == 3
    for path in files:
        flip_tensor_bytes(path, count=64)
        assert torch_file_problem(path) is not None
    damaged_train = next(p for p in files if "-train-" in p.name)
    assert not torch.equal(torch.load(damaged_train, weights_only=True)["images"], reference.split_images["train"])
    with caplog.at_level(logging.WARNING):
        make_dm(mini_root, tmp_path).prepare_data()  # prepare_data alone finds and rebuilds the damaged caches
    assert all(torch_file_problem(p) is None for p in files)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all(any(str(p) in w for w in warnings) for p in files), warnings
    flip_tensor_bytes(damaged_train, count=64)
    dm = make_dm(mini_root, tmp_path)
    dm.setup()  # so does setup
    assert all(torch.equal(dm.split_images[s], reference.split_images[s]) for s in reference.split_images)
    assert torch_file_problem(damaged_train) is None


@pytest.mark.parametrize("how", ["under_a_file", "chmod", "denied"])
def test_miniimagenet_unwritable_cache_dir_fails_before_decoding(tmp_path, monkeypatch, how):
    root = write_pickle_layout(tmp_path / "data")
    cache = unwritable_cache_dir(how, tmp_path, monkeypatch)
    monkeypatch.setattr(mini, "decode_pickle_split", no_decode)
    dm = make_dm(root, tmp_path, cache_dir=str(cache))
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(PermissionError, match=rf"cache folder {re.escape(str(cache))} cannot be written.*{FIX}"):
            step()


@pytest.mark.parametrize("how", ["chmod", "denied"])
def test_miniimagenet_valid_cache_in_read_only_dir_loads(tmp_path, monkeypatch, how):
    root = write_csv_layout(tmp_path / "data")
    make_dm(root, tmp_path).prepare_data()
    cache = unwritable_cache_dir(how, tmp_path, monkeypatch, existing=tmp_path / "cache")
    monkeypatch.setattr(mini, "decode_csv_split", no_decode)
    dm = make_dm(root, tmp_path, cache_dir=str(cache))
    dm.prepare_data()
    dm.setup()
    assert dm.split_images["val"].shape == (2, 4, 3, SIZE, SIZE)
