"""Mini-ImageNet few-shot episodes (Vinyals et al. 2016; the Ravi & Larochelle 2017 split).

64 train / 16 val / 20 test classes of 600 RGB images each, 84x84 pixels. There is no reliable
public download, so this module reads a copy the user already has, in either common layout:

* ``"csv"``: ``images/`` (JPEG/PNG files) plus ``train.csv``, ``val.csv``, ``test.csv`` with the
  header ``filename,label`` (one row per image, ``filename`` relative to ``images/``).
* ``"pickle"``: learn2learn's ``mini-imagenet-cache-{train,validation,test}.pkl``, each a pickled
  ``{"image_data": uint8 [N, 84, 84, 3], "class_dict": {class_name: [indices into image_data]}}``.
  Pickles can run code when loaded, so they are read with :class:`NumpyOnlyUnpickler`, which only
  rebuilds numpy arrays, dicts and lists and refuses anything else.

Each split is decoded once into a uint8 tensor ``[n_classes, n_samples, 3, H, W]`` cached in a cache
directory (the data folder may be read-only); later runs load the cache once its CRC-32s check out (a
damaged cache is rebuilt, never used). Classes are sorted by name;
images keep their order in the CSV / ``class_dict``. If classes have different numbers of images,
every class keeps the first ``min`` images (the standard data has 600 everywhere).
"""

from __future__ import annotations

import builtins
import codecs
import csv
import hashlib
import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .episodic import ClassImageDataModule, require_positive
from .files import data_root, default_cache_dir, load_or_build_cache
from .sampler import SPLITS

LAYOUTS = ("auto", "csv", "pickle")
CSV_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
PICKLE_FILES = {"train": "mini-imagenet-cache-train.pkl", "val": "mini-imagenet-cache-validation.pkl",
                "test": "mini-imagenet-cache-test.pkl"}
IMAGES_DIR = "images"
CACHE_VERSION = 1


# ----------------------------------------------------------------------------- restricted unpickling

_SAFE_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str",
                  "bytes", "bytearray", "range")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a Mini-ImageNet pickle may name: numpy array/scalar rebuilders and plain builtins."""
    try:  # numpy >= 2 (numpy.core is a deprecated alias there; resolve both names without importing it)
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): codecs.encode}  # bytes in protocol <= 2
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # protocol 5
            allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    for module in ("builtins", "__builtin__"):  # __builtin__: Python 2 pickles
        for name in _SAFE_BUILTINS:
            allowed[(module, name)] = getattr(builtins, name)
    allowed[("__builtin__", "xrange")] = range
    return allowed


class NumpyOnlyUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that rebuilds numpy arrays, numpy scalars, dicts, lists and other plain
    builtins, and raises ``pickle.UnpicklingError`` for any other global (``os.system``, ...), so a
    malicious file cannot run code. Python 2 pickles are read with ``encoding="latin1"``.
    """

    def __init__(self, file, *, source: str = "the pickle") -> None:
        super().__init__(file, encoding="latin1")
        self.source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} from {self.source}: a Mini-ImageNet pickle holds only "
                f"numpy arrays, dicts and lists, so this file is not one and may run code if unpickled "
                f"normally. Replace it with learn2learn's file, or use the CSV layout (images/ + train.csv, "
                f"val.csv, test.csv)"
            ) from None


def load_pickle(path: Path) -> Any:
    """Unpickle ``path`` with :class:`NumpyOnlyUnpickler`; any failure is a ``ValueError`` naming the file."""
    try:
        with open(path, "rb") as f:
            return NumpyOnlyUnpickler(f, source=str(path)).load()
    except OSError:
        raise
    except Exception as e:  # UnpicklingError (refused global, bad opcode), EOFError (truncated), numpy errors
        raise ValueError(f"{path} could not be unpickled ({type(e).__name__}: {e}); replace it with a fresh copy "
                         f"of learn2learn's {path.name}") from e


# ----------------------------------------------------------------------------- finding the files

def find_layout(data_dir: Path, layout: str = "auto") -> tuple[str, dict[str, Path]] | None:
    """The layout found in ``data_dir`` and its per-split source files, else ``None``.

    ``"auto"`` prefers the pickle files (already decoded) and falls back to the CSV layout.
    Returns ``("pickle", {split: .pkl})`` or ``("csv", {split: .csv})`` (images in ``data_dir/images``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {', '.join(map(repr, LAYOUTS))}")
    if layout in ("auto", "pickle") and not _missing(data_dir, "pickle"):
        return "pickle", {s: data_dir / PICKLE_FILES[s] for s in SPLITS}
    if layout in ("auto", "csv") and not _missing(data_dir, "csv"):
        return "csv", {s: data_dir / CSV_FILES[s] for s in SPLITS}
    return None


def _missing(data_dir: Path, layout: str) -> list[str]:
    if layout == "pickle":
        return [str(data_dir / f) for f in PICKLE_FILES.values() if not (data_dir / f).is_file()]
    missing = [] if (data_dir / IMAGES_DIR).is_dir() else [f"{data_dir / IMAGES_DIR}/ (folder)"]
    return missing + [str(data_dir / f) for f in CSV_FILES.values() if not (data_dir / f).is_file()]


def missing_message(data_dir: Path, layout: str) -> str:
    """What to put where, for each layout ``layout`` accepts, and what is missing now."""
    helps = {"csv": f"layout 'csv': the JPEG/PNG files in {data_dir / IMAGES_DIR}/ and {', '.join(CSV_FILES.values())} "
                    f"in {data_dir} (Ravi & Larochelle split: header 'filename,label', one row per image, filename "
                    f"relative to images/)",
             "pickle": f"layout 'pickle': learn2learn's {', '.join(PICKLE_FILES.values())} in {data_dir}"}
    wanted = {"auto": ("csv", "pickle"), "csv": ("csv",), "pickle": ("pickle",)}[layout]
    lines = [f"Mini-ImageNet (layout={layout!r}) not found in {data_dir}, and there is no automatic download. "
             f"Put {'one of these layouts' if len(wanted) > 1 else 'these files'} there, or set data_dir to the "
             f"folder that holds them:"]
    lines += [f"  {helps[w]}" for w in wanted]
    lines += [f"Missing for layout {w!r}: {_missing(data_dir, w)}" for w in wanted]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CSV layout

def read_csv_split(csv_path: Path, images_dir: Path) -> dict[str, list[Path]]:
    """``{class label: [image paths in row order]}`` of a Ravi & Larochelle CSV (header ``filename,label``)."""
    fix = f"fix {csv_path} to the Ravi & Larochelle format: a header row 'filename,label', then one row per image"
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows, [])]
        if "filename" not in header or "label" not in header:
            raise ValueError(f"{csv_path} has header {header} without the columns 'filename' and 'label'; {fix}")
        i_file, i_label = header.index("filename"), header.index("label")
        classes: dict[str, list[Path]] = {}
        for line, row in enumerate(rows, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue  # blank line
            if len(row) <= max(i_file, i_label) or not row[i_file].strip() or not row[i_label].strip():
                raise ValueError(f"{csv_path} line {line} is {row}: it needs a filename and a label; {fix}")
            classes.setdefault(row[i_label].strip(), []).append(images_dir / row[i_file].strip())
    if not classes:
        raise ValueError(f"{csv_path} has no image rows; {fix}")
    return classes


def _csv_stats(csv_path: Path, classes: dict[str, list[Path]]) -> list:
    """Names, sizes and mtimes of the CSV and every image it names (``FileNotFoundError`` names missing ones)."""
    stats: list = []
    missing: list[str] = []
    for path in [csv_path] + [p for paths in classes.values() for p in paths]:
        try:
            st = path.stat()
        except FileNotFoundError:
            missing.append(str(path))
            continue
        stats.append((path.name, st.st_size, st.st_mtime_ns))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) named in {csv_path} are missing, e.g. {missing[:3]}; put them in "
            f"{csv_path.parent / IMAGES_DIR} (the 'filename' column is relative to images/) or remove their rows"
        )
    return stats


def read_image(path: Path, image_size: int, csv_path: Path | None = None) -> np.ndarray:
    """``path`` as uint8 ``[3, image_size, image_size]`` RGB (Lanczos-resized if not already that size)."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
            return np.asarray(img).transpose(2, 0, 1)
    except Exception as e:  # PIL raises several types for bad bytes (UnidentifiedImageError, OSError, ...)
        where = f"; replace it with a good copy or remove its row from {csv_path}" if csv_path else ""
        raise ValueError(f"{path} is not a readable image ({type(e).__name__}: {e}){where}") from e


def decode_csv_split(csv_path: Path, classes: dict[str, list[Path]], image_size: int) -> dict:
    """Decode a CSV split: ``{"images": uint8 [n_classes, min count, 3, S, S], "classes": sorted names}``."""
    names = sorted(classes)
    n_samples = min(len(classes[c]) for c in names)
    images = np.empty((len(names), n_samples, 3, image_size, image_size), dtype=np.uint8)
    jobs = [(i, j, path) for i, c in enumerate(names) for j, path in enumerate(classes[c][:n_samples])]

    def work(job: tuple[int, int, Path]) -> None:  # PIL releases the GIL while decoding and resizing
        i, j, path = job
        images[i, j] = read_image(path, image_size, csv_path)

    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        for _ in pool.map(work, jobs):
            pass  # re-raises the first failure
    return {"images": torch.from_numpy(images), "classes": names}


# ----------------------------------------------------------------------------- pickle layout

def decode_pickle_split(path: Path, image_size: int) -> dict:
    """Decode a learn2learn pickle: ``{"images": uint8 [n_classes, min count, 3, S, S], "classes": sorted names}``."""
    fix = (f"replace it with learn2learn's {path.name} (a dict with 'image_data': uint8 [N, 84, 84, 3] and "
           f"'class_dict': {{class name: [indices into image_data]}}), or use the CSV layout")
    data = load_pickle(path)
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} lacks the keys 'image_data' and 'class_dict' (found {found}); {fix}")
    image_data, class_dict = data["image_data"], data["class_dict"]
    if not isinstance(image_data, np.ndarray) or image_data.dtype != np.uint8 or image_data.ndim != 4 \
            or image_data.shape[-1] != 3:
        what = (f"{image_data.dtype} array of shape {image_data.shape}" if isinstance(image_data, np.ndarray)
                else type(image_data).__name__)
        raise ValueError(f"{path}: 'image_data' is a {what}, not a uint8 array [N, H, W, 3]; {fix}")
    if not isinstance(class_dict, dict) or not class_dict:
        raise ValueError(f"{path}: 'class_dict' is {type(class_dict).__name__} {class_dict!r:.80}, not a non-empty "
                         f"dict of class name -> image indices; {fix}")
    n_images = image_data.shape[0]
    indices: dict[str, np.ndarray] = {}
    for name, idx in class_dict.items():
        try:
            arr = np.asarray(list(idx))
        except TypeError:
            arr = np.asarray(None)
        if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= n_images:
            raise ValueError(f"{path}: class {name!r} has indices {idx!r:.80}; each class needs a non-empty list of "
                             f"integer indices in 0..{n_images - 1} (the images of 'image_data'); {fix}")
        indices[str(name)] = arr.astype(np.int64)
    names = sorted(indices)
    n_samples = min(len(indices[c]) for c in names)
    images = np.empty((len(names), n_samples, 3, image_size, image_size), dtype=np.uint8)
    same_size = image_data.shape[1:3] == (image_size, image_size)
    for i, name in enumerate(names):  # class by class: peak memory is the pickle plus the result
        picked = image_data[indices[name][:n_samples]]  # [n_samples, H, W, 3]
        if same_size:
            images[i] = picked.transpose(0, 3, 1, 2)
        else:
            for j in range(n_samples):
                img = Image.fromarray(picked[j]).resize((image_size, image_size), Image.Resampling.LANCZOS)
                images[i, j] = np.asarray(img).transpose(2, 0, 1)
    return {"images": torch.from_numpy(images), "classes": names}


# ----------------------------------------------------------------------------- cache

def cached_split(layout: str, split: str, source: Path, image_size: int, cache_dir: Path,
                 load: bool = True) -> dict | None:
    """The decoded ``split`` (``{"images", "classes"}``), cached in ``cache_dir``.

    The cache key covers the source files' names, sizes and mtimes (for the CSV layout: the CSV and
    every image it names) and ``image_size``. ``load=False`` only makes sure an intact cache exists (returns
    ``None`` when it already does). A damaged cache is rebuilt, an unwritable folder fails before decoding
    (:func:`~lit_meta.datamodules.files.load_or_build_cache`).
    """
    decode: Callable[[], dict]
    if layout == "csv":
        classes = read_csv_split(source, source.parent / IMAGES_DIR)
        stats = _csv_stats(source, classes)
        decode = lambda: decode_csv_split(source, classes, image_size)  # noqa: E731
    else:
        st = source.stat()
        stats = [(source.name, st.st_size, st.st_mtime_ns)]
        decode = lambda: decode_pickle_split(source, image_size)  # noqa: E731
    key = hashlib.sha1(json.dumps([layout, split, stats, image_size, CACHE_VERSION]).encode()).hexdigest()[:16]
    path = cache_dir / f"miniimagenet-{split}-{image_size}px-{key}.pt"
    return load_or_build_cache(path, decode, load, _not_uint8_images)


def _not_uint8_images(data: Any) -> str | None:
    """Why ``data`` is not a decoded split (``{"images": uint8 tensor, ...}``), or ``None``."""
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, Tensor) and images.dtype == torch.uint8:
        return None
    return f"holds {type(data).__name__} without a uint8 tensor 'images'"


# ----------------------------------------------------------------------------- the DataModule

class MiniImageNetDataModule(ClassImageDataModule):
    """Mini-ImageNet N-way K-shot episodes from a local copy (no download).

    Args:
        data_dir: folder holding the data in one of two layouts (see ``layout``). Default:
            ``$LIT_META_DATA/miniimagenet``, else ``~/.cache/lit_meta/data/miniimagenet``.
        layout: ``"csv"``: ``images/`` (JPEG/PNG files) + ``train.csv``, ``val.csv``, ``test.csv`` (header
            ``filename,label``, filenames relative to ``images/``); ``"pickle"``: learn2learn's
            ``mini-imagenet-cache-train.pkl``, ``-validation.pkl``, ``-test.pkl``; ``"auto"`` (default):
            pickle if all three files are there, else CSV.
        image_size: side of the square RGB images in pixels; images of another size are Lanczos-resized.
            Default 84.
        cache_dir: where decoded uint8 tensors are cached. Default ``$LIT_META_CACHE/miniimagenet``, else
            ``~/.cache/lit_meta/miniimagenet``.
        n_way: classes per task. Default 5.
        k_shot: support images per class. Default 1.
        k_query: query images per class. Default 15.
        **kwargs: :class:`~lit_meta.datamodules.EpisodicDataModule`'s (``meta_batch_size``, ``seed``, ...).

    After ``setup``, ``split_images[split]`` is uint8 ``[n_classes, n_samples, 3, image_size, image_size]``,
    ``split_classes[split]`` the class names (sorted) and ``found_layout`` the layout read.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        layout: Literal["auto", "csv", "pickle"] = "auto",
        image_size: int = 84,
        cache_dir: str | None = None,
        n_way: int = 5,
        k_shot: int = 1,
        k_query: int = 15,
        **kwargs,
    ) -> None:
        super().__init__(n_way=n_way, k_shot=k_shot, k_query=k_query, **kwargs)
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not one of {', '.join(map(repr, LAYOUTS))}")
        require_positive(image_size=image_size)
        self.data_dir = Path(data_dir).expanduser() if data_dir else data_root() / "miniimagenet"
        self.layout, self.image_size = layout, image_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "miniimagenet"
        self.found_layout: str | None = None
        self.split_classes: dict[str, list[str]] = {}

    def _sources(self) -> tuple[str, dict[str, Path]]:
        found = find_layout(self.data_dir, self.layout)
        if found is None:
            raise FileNotFoundError(missing_message(self.data_dir, self.layout))
        return found

    def prepare_data(self) -> None:
        """Decode every split into the cache if it is not there yet or damaged (rank 0 of each node)."""
        layout, sources = self._sources()
        for split in SPLITS:
            cached_split(layout, split, sources[split], self.image_size, self.cache_dir, load=False)

    def setup(self, stage: str | None = None) -> None:
        layout, sources = self._sources()
        data = {s: cached_split(layout, s, sources[s], self.image_size, self.cache_dir) for s in SPLITS}
        self.found_layout = layout
        self.split_classes = {s: list(d["classes"]) for s, d in data.items()}
        self.set_split_images({s: d["images"] for s, d in data.items()})
