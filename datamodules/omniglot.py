"""Omniglot few-shot episodes (Lake et al. 2015), read straight from the official zip files.

The images are decoded once into a uint8 tensor cache (``[n_characters, 20, 1, H, W]``, strokes
bright) in a cache directory, so the data folder may be read-only; later runs load the cache once its
CRC-32s check out (a damaged cache is rebuilt, never used).
Classes are characters, augmented by 90-degree rotations (each rotation a new class, as in
MAML/iMAML); all rotations of a character stay in the same split.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .episodic import ClassImageDataModule, require_positive
from .files import check_archive_members, data_root, default_cache_dir, download, load_or_build_cache

URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
FULL = {"images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
        "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811"}
MINIMAL = {"images_background_small1.zip": "e704a628b5459e08445c13499850abc4",
           "images_background_small2.zip": "b75a71a51d3b13f821f212756fe481fd"}
# Characters of full Omniglot (1623): MAML/iMAML meta-train on 1200 and meta-test on 423; 100 of
# the 1200 are held out for validation (as in "How to train your MAML"): 1100 / 100 / 423.
STANDARD_SPLIT = (1100, 100, 423)
CACHE_VERSION = 1


def find_zips(data_dir: Path, variant: str) -> list[Path] | None:
    """The zips of ``variant`` present in ``data_dir`` ('auto' prefers the full set), else ``None``."""
    for name, files in (("full", FULL), ("minimal", MINIMAL)):
        if variant in (name, "auto") and all((data_dir / f).is_file() for f in files):
            return [data_dir / f for f in files]
    return None


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} is not a readable zip archive ({e}); it may be truncated or corrupt: "
                         f"replace it with a fresh copy of the official file") from e
    try:
        check_archive_members(archive.namelist(), path)  # images are read in place, never extracted; still refuse
    except ValueError:
        archive.close()
        raise
    return archive


def decode_zips(zips: list[Path], image_size: int) -> dict:
    """Decode every character of ``zips`` (duplicates across zips kept once) to a uint8 tensor.

    Returns ``{"images": [n_chars, n_drawers, 1, S, S] uint8, "alphabets": [...], "characters": [...],
    "background": [...]}`` with one list entry per character, sorted by (alphabet, character).
    """
    entries: dict[tuple[str, str], tuple[Path, list[str], bool]] = {}
    for path in zips:
        with _open_zip(path) as archive:
            for name in archive.namelist():
                parts = name.split("/")
                if len(parts) != 4 or not parts[3].endswith(".png"):
                    continue
                key = (parts[1], parts[2])
                if key in entries and entries[key][0] != path:
                    continue  # the same character in two zips (Greek/Latin in the minimal splits)
                entries.setdefault(key, (path, [], "evaluation" not in path.name))[1].append(name)
    if not entries:
        raise ValueError(f"no Omniglot images (<root>/<alphabet>/<character>/<id>.png) in {[str(z) for z in zips]}")
    keys = sorted(entries)
    counts = {len(entries[k][1]) for k in keys}
    if len(counts) != 1:
        bad = [f"{a}/{c}: {len(entries[(a, c)][1])}" for a, c in keys if len(entries[(a, c)][1]) != max(counts)]
        raise ValueError(f"characters have different numbers of images ({bad[:5]}); the zip is incomplete: "
                         f"replace it with a fresh copy of the official file")
    images = np.empty((len(keys), counts.pop(), 1, image_size, image_size), dtype=np.uint8)
    archives = {path: _open_zip(path) for path in zips}
    try:
        for i, key in enumerate(keys):
            path, names, _ = entries[key]
            for j, name in enumerate(sorted(names)):
                try:
                    with Image.open(io.BytesIO(archives[path].read(name))) as img:
                        img = img.convert("L").resize((image_size, image_size), Image.Resampling.LANCZOS)
                        images[i, j, 0] = 255 - np.asarray(img)  # strokes bright, background 0
                except Exception as e:  # PIL raises several types for bad bytes; zipfile raises on bad CRC
                    raise ValueError(f"{path}:{name} is not a readable PNG ({type(e).__name__}: {e}); the file is "
                                     f"corrupt: replace {path.name} with a fresh copy of the official file") from e
    finally:
        for archive in archives.values():
            archive.close()
    return {"images": torch.from_numpy(images), "alphabets": [a for a, _ in keys],
            "characters": [c for _, c in keys], "background": [entries[k][2] for k in keys]}


def cached_decode(zips: list[Path], image_size: int, cache_dir: Path) -> dict:
    """:func:`decode_zips`, cached in ``cache_dir`` under a key of the files' names, sizes and times
    (see :func:`load_or_build_cache`: a damaged cache is rebuilt, an unwritable folder fails before decoding)."""
    stats = [(z.name, z.stat().st_size, z.stat().st_mtime_ns) for z in zips]
    key = hashlib.sha1(json.dumps([stats, image_size, CACHE_VERSION]).encode()).hexdigest()[:16]
    path = cache_dir / f"omniglot-{image_size}px-{key}.pt"
    return load_or_build_cache(path, lambda: decode_zips(zips, image_size))


def split_indices(meta: dict, split: str, split_sizes: tuple[int, int, int] | None, split_seed: int) -> dict[str, np.ndarray]:
    """Character indices of train/val/test.

    ``split="characters"``: a seeded permutation of characters cut into ``split_sizes`` characters
    (default: 1100/100/423 on full Omniglot, i.e. the standard 1200 meta-train characters with
    100 of them held out for validation, and the same proportions on other data).
    ``split="alphabets"``: whole alphabets per split, so meta-test alphabets are never seen in
    meta-training. ``split_sizes`` counts alphabets; default: on full Omniglot the 20 evaluation
    alphabets are test and 5 seeded background alphabets val; otherwise 1 val and 2 test alphabets
    per 8 (at least one each).
    """
    rng = np.random.default_rng(split_seed)
    n_chars = len(meta["characters"])
    if split == "characters":
        if split_sizes is None:
            val = round(n_chars * STANDARD_SPLIT[1] / sum(STANDARD_SPLIT))
            test = round(n_chars * STANDARD_SPLIT[2] / sum(STANDARD_SPLIT))
            split_sizes = (n_chars - val - test, val, test)
        _check_sizes(split_sizes, n_chars, "characters")
        order = rng.permutation(n_chars)
        a, b = split_sizes[0], split_sizes[0] + split_sizes[1]
        return {"train": np.sort(order[:a]), "val": np.sort(order[a:b]), "test": np.sort(order[b:b + split_sizes[2]])}
    alphabets = np.array(sorted(set(meta["alphabets"])))
    per_char = np.array(meta["alphabets"])
    background = {a for a, bg in zip(meta["alphabets"], meta["background"]) if bg}
    if split_sizes is None and len(background) < len(alphabets):
        test_alpha = np.array(sorted(set(alphabets) - background))
        bg = np.array(sorted(background))
        val_alpha = rng.permutation(bg)[:max(1, round(len(bg) * 5 / 30))]
        groups = {"train": np.setdiff1d(bg, val_alpha), "val": val_alpha, "test": test_alpha}
    else:
        if split_sizes is None:
            n_val, n_test = max(1, round(len(alphabets) / 8)), max(1, round(len(alphabets) * 2 / 8))
            split_sizes = (len(alphabets) - n_val - n_test, n_val, n_test)
        _check_sizes(split_sizes, len(alphabets), "alphabets")
        order = rng.permutation(alphabets)
        a, b = split_sizes[0], split_sizes[0] + split_sizes[1]
        groups = {"train": order[:a], "val": order[a:b], "test": order[b:b + split_sizes[2]]}
    return {name: np.flatnonzero(np.isin(per_char, group)) for name, group in groups.items()}


def _check_sizes(sizes: tuple[int, int, int], total: int, what: str) -> None:
    if len(sizes) != 3 or min(sizes) < 1 or sum(sizes) > total:
        raise ValueError(f"split_sizes={tuple(sizes)} must be three positive counts of {what} (train, val, test) "
                         f"summing to at most the {total} {what} in the data")


def with_rotations(images: Tensor, rotations: int) -> Tensor:
    """``[n, S, C, H, W] -> [n * rotations, S, C, H, W]``: class ``i * rotations + r`` is character i turned r x 90 deg."""
    return torch.stack([torch.rot90(images, r, dims=(-2, -1)) for r in range(rotations)], dim=1).flatten(0, 1)


class OmniglotDataModule(ClassImageDataModule):
    """Omniglot N-way K-shot episodes.

    Args:
        data_dir: folder with the official zips: ``images_background.zip`` + ``images_evaluation.zip``
            (full, 1623 characters) or ``images_background_small1.zip`` + ``images_background_small2.zip``
            (minimal, 242 characters). Default: ``$LIT_META_DATA/omniglot``, else
            ``~/.cache/lit_meta/data/omniglot``.
        variant: ``"auto"`` (full if present, else minimal), ``"full"`` or ``"minimal"``.
        download: fetch the full zips (MD5-checked) when they are missing. Default True.
        split: ``"characters"`` (the standard seeded split by character) or ``"alphabets"`` (meta-test
            alphabets never seen in meta-training).
        split_sizes: (train, val, test) counts of characters or alphabets; default: see
            :func:`split_indices`.
        split_seed: seed of the split (kept apart from the episode seed so splits never move). Default 0.
        image_size: side of the square images in pixels. Default 28.
        rotations: classes per character from 90-degree rotations, 1 to 4 (1 = none). Default 4.
        cache_dir: where decoded tensors are cached. Default ``~/.cache/lit_meta/omniglot``.
        **kwargs: ``n_way``, ``k_shot``, ``k_query`` and :class:`~lit_meta.datamodules.EpisodicDataModule`'s.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        variant: Literal["auto", "full", "minimal"] = "auto",
        download: bool = True,
        split: Literal["characters", "alphabets"] = "characters",
        split_sizes: tuple[int, int, int] | None = None,
        split_seed: int = 0,
        image_size: int = 28,
        rotations: int = 4,
        cache_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if variant not in ("auto", "full", "minimal"):
            raise ValueError(f"variant={variant!r} is not one of 'auto', 'full', 'minimal'")
        if split not in ("characters", "alphabets"):
            raise ValueError(f"split={split!r} is not one of 'characters', 'alphabets'")
        require_positive(image_size=image_size)
        if not 1 <= rotations <= 4:
            raise ValueError(f"rotations={rotations} must be between 1 (no rotation) and 4 (0/90/180/270 degrees)")
        self.data_dir = Path(data_dir).expanduser() if data_dir else data_root() / "omniglot"
        self.variant, self.download, self.split, self.split_sizes = variant, download, split, split_sizes
        self.split_seed, self.image_size, self.rotations = split_seed, image_size, rotations
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "omniglot"
        self.split_characters: dict[str, list[tuple[str, str]]] = {}

    def prepare_data(self) -> None:
        """Download the full zips if no usable set is in ``data_dir`` (rank 0 only), then build the cache (or
        rebuild a damaged one)."""
        zips = find_zips(self.data_dir, self.variant)
        if zips is None:
            if not self.download or self.variant == "minimal":
                raise FileNotFoundError(self._missing_message())
            try:
                zips = [download(URL + name, self.data_dir / name, md5) for name, md5 in FULL.items()]
            except OSError as e:
                raise FileNotFoundError(f"{self._missing_message()}\nThe download failed: {e}") from e
        cached_decode(zips, self.image_size, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        zips = find_zips(self.data_dir, self.variant)
        if zips is None:
            raise FileNotFoundError(self._missing_message())
        meta = cached_decode(zips, self.image_size, self.cache_dir)
        indices = split_indices(meta, self.split, self.split_sizes, self.split_seed)
        self.split_characters = {s: [(meta["alphabets"][i], meta["characters"][i]) for i in idx]
                                 for s, idx in indices.items()}
        self.set_split_images({s: with_rotations(meta["images"][idx], self.rotations) for s, idx in indices.items()})

    def _missing_message(self) -> str:
        full, minimal = " + ".join(FULL), " + ".join(MINIMAL)
        wanted = {"auto": f"{full} (full) or {minimal} (minimal)", "full": full, "minimal": minimal}[self.variant]
        fix = "" if self.variant == "minimal" else ", or set download=True on a machine with a network"
        return (f"Omniglot (variant={self.variant!r}) not found in {self.data_dir}. Put {wanted} there "
                f"(from {URL}, the dataset authors' GitHub, folder python/), set data_dir to the folder that "
                f"holds them{fix}")
