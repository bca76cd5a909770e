"""MiniImageNetDataModule on tiny fake data: 6 classes x 4 solid-colour images, in both layouts."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lit_meta.datamodules.miniimagenet as mini
from lit_meta.datamodules.miniimagenet import MiniImageNetDataModule, NumpyOnlyUnpickler, find_layout
from lit_meta.episode import Episode

SIZE = 12
N_IMAGES = 4
# Class names deliberately not in sorted order within a split; classes are sorted by name.
CLASSES = {"train": ["n02", "n01"], "val": ["n03", "n04"], "test": ["n06", "n05"]}


def colour(name: str, j: int) -> tuple[int, int, int]:
    """A distinct solid colour per (class, image): red encodes the class, green the image."""
    c = int(name[1:])
    return (40 * c, 50 * j + 10, 200 - 30 * c)


def solid(name: str, j: int, size: int = SIZE) -> np.ndarray:
    return np.full((size, size, 3), colour(name, j), dtype=np.uint8)


def write_csv_layout(root: Path, size: int = SIZE, counts: dict[str, int] | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    for split, names in CLASSES.items():
        rows = ["filename,label"]
        for name in names:
            for j in range((counts or {}).get(name, N_IMAGES)):
                filename = f"{name}{j:08d}.png"
                Image.fromarray(solid(name, j, size)).save(root / "images" / filename)
                rows.append(f"{filename},{name}")
        (root / mini.CSV_FILES[split]).write_text("\n".join(rows) + "\n")
    return root


def pickle_dict(split: str, counts: dict[str, int] | None = None) -> dict:
    """learn2learn's format, with the images of different classes interleaved in image_data."""
    images, class_dict = [], {}
    for j in range(N_IMAGES):
        for name in CLASSES[split]:
            if j < (counts or {}).get(name, N_IMAGES):
                class_dict.setdefault(name, []).append(len(images))
                images.append(solid(name, j))
    return {"image_data": np.stack(images), "class_dict": class_dict}


def write_pickle_layout(root: Path, counts: dict[str, int] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split in CLASSES:
        with open(root / mini.PICKLE_FILES[split], "wb") as f:
            pickle.dump(pickle_dict(split, counts), f)
    return root


def make_dm(root: Path, tmp_path: Path, **kwargs) -> MiniImageNetDataModule:
    args = dict(data_dir=str(root), image_size=SIZE, cache_dir=str(tmp_path / "cache"), n_way=2, k_shot=1,
                k_query=2, meta_batch_size=3, steps_per_epoch=2, eval_episodes=4, eval_meta_batch_size=2)
    return MiniImageNetDataModule(**(args | kwargs))


@pytest.fixture(params=["csv", "pickle"])
def layout_dir(request, tmp_path) -> tuple[str, Path]:
    root = tmp_path / "data"
    writer = write_csv_layout if request.param == "csv" else write_pickle_layout
    return request.param, writer(root)


@pytest.mark.parametrize("layout_arg", ["auto", "explicit"])
def test_layout_loads_shapes_and_pixels(layout_dir, layout_arg, tmp_path):
    layout, root = layout_dir
    dm = make_dm(root, tmp_path, layout=layout if layout_arg == "explicit" else "auto")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.found_layout == layout
    for split, names in CLASSES.items():
        images = dm.split_images[split]
        assert images.dtype == torch.uint8 and images.shape == (2, N_IMAGES, 3, SIZE, SIZE)
        assert dm.split_classes[split] == sorted(names)
        for i, name in enumerate(sorted(names)):  # every pixel of every image round-trips, in its class
            for j in range(N_IMAGES):
                expected = torch.tensor(colour(name, j), dtype=torch.uint8)[:, None, None].expand(3, SIZE, SIZE)
                assert torch.equal(images[i, j], expected), (split, name, j)


def test_episode_format(layout_dir, tmp_path):
    _, root = layout_dir
    dm = make_dm(root, tmp_path)
    dm.setup("fit")
    episode = dm.dataset("train")[(0, 0)]
    assert isinstance(episode, Episode)
    assert episode.support_x.shape == (3, 2 * 1, 3, SIZE, SIZE) and episode.support_x.dtype == torch.uint8
    assert episode.query_x.shape == (3, 2 * 2, 3, SIZE, SIZE) and episode.query_x.dtype == torch.uint8
    assert episode.support_y.tolist() == [[0, 1]] * 3 and episode.query_y.tolist() == [[0, 0, 1, 1]] * 3
    # Within a task, support and query images of a label come from the same class (red channel = class).
    for t in range(3):
        for label in range(2):
            reds = torch.cat([episode.support_x[t][episode.support_y[t] == label, 0],
                              episode.query_x[t][episode.query_y[t] == label, 0]]).unique()
            assert reds.numel() == 1 and int(reds) // 40 in (1, 2)
    assert next(iter(dm.val_dataloader())).support_x.shape == (2, 2, 3, SIZE, SIZE)


def test_csv_images_resized_and_jpeg(tmp_path):
    root = write_csv_layout(tmp_path / "data", size=20)
    name = "n01"
    Image.fromarray(solid(name, 0, 20)).save(root / "images" / "n0100000000.jpg", quality=95)
    csv_path = root / "train.csv"
    csv_path.write_text(csv_path.read_text().replace("n0100000000.png", "n0100000000.jpg"))
    dm = make_dm(root, tmp_path)
    dm.setup()
    images = dm.split_images["train"]
    assert images.shape == (2, N_IMAGES, 3, SIZE, SIZE)
    assert torch.equal(images[0, 1], torch.tensor(colour(name, 1), dtype=torch.uint8)[:, None, None].expand(3, SIZE, SIZE))
    jpeg = images[0, 0].int() - torch.tensor(colour(name, 0))[:, None, None]
    assert jpeg.abs().max() <= 3  # JPEG is lossy; a solid colour comes back within a few levels


def test_pickle_resized(tmp_path):
    root = write_pickle_layout(tmp_path / "data")
    dm = make_dm(root, tmp_path, image_size=8)
    dm.setup()
    assert dm.split_images["val"].shape == (2, N_IMAGES, 3, 8, 8)
    assert torch.equal(dm.split_images["val"][1, 2, :, 0, 0], torch.tensor(colour("n04", 2), dtype=torch.uint8))


@pytest.mark.parametrize("layout", ["csv", "pickle"])
def test_unequal_class_sizes_keep_the_minimum(layout, tmp_path):
    counts = {"n01": 3}
    root = (write_csv_layout(tmp_path / "data", counts=counts) if layout == "csv"
            else write_pickle_layout(tmp_path / "data", counts=counts))
    dm = make_dm(root, tmp_path)
    dm.setup()
    assert dm.split_images["train"].shape[:2] == (2, 3) and dm.split_images["val"].shape[:2] == (2, N_IMAGES)
    with pytest.raises(ValueError, match=r"k_shot \+ k_query = 1 \+ 3 = 4 is larger than the 3 samples"):
        make_dm(root, tmp_path, k_query=3).setup()


def test_cache_is_used_and_keyed_on_sources(layout_dir, tmp_path, monkeypatch):
    layout, root = layout_dir
    make_dm(root, tmp_path).prepare_data()
    files = sorted((tmp_path / "cache").glob("miniimagenet-*.pt"))
    assert len(files) == 3
    assert torch.load(files[0], weights_only=True)["images"].dtype == torch.uint8

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again although the cache is there")

    monkeypatch.setattr(mini, "decode_csv_split", no_decode)
    monkeypatch.setattr(mini, "decode_pickle_split", no_decode)
    dm = make_dm(root, tmp_path)
    dm.prepare_data()
    dm.setup()
    assert dm.split_images["test"].shape == (2, N_IMAGES, 3, SIZE, SIZE)
    # A changed source file changes the key: the split is decoded again.
    source = root / (mini.CSV_FILES["val"] if layout == "csv" else mini.PICKLE_FILES["val"])
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        make_dm(root, tmp_path).setup()
    # So does another image_size.
    with pytest.raises(AssertionError, match="decoded again"):
        make_dm(root, tmp_path, image_size=8).setup()


def test_unreadable_cache_is_rebuilt(tmp_path):
    root = write_pickle_layout(tmp_path / "data")
    make_dm(root, tmp_path).prepare_data()
    for f in (tmp_path / "cache").glob("*.pt"):
        f.write_bytes(b"garbage")
    dm = make_dm(root, tmp_path)
    dm.setup()
    assert dm.split_images["train"].shape == (2, N_IMAGES, 3, SIZE, SIZE)


def test_auto_prefers_pickle_and_find_layout(tmp_path):
    root = write_pickle_layout(write_csv_layout(tmp_path / "data"))
    assert find_layout(root)[0] == "pickle"
    assert find_layout(root, "csv") == ("csv", {s: root / f for s, f in mini.CSV_FILES.items()})
    assert find_layout(tmp_path / "nothing") is None


# ----------------------------------------------------------------------------- bad input

def test_nothing_there(tmp_path):
    dm = make_dm(tmp_path / "empty", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"(?s)no automatic download.*images/.*train\.csv, val\.csv, "
                                                r"test\.csv.*mini-imagenet-cache-train\.pkl"):
        dm.setup()
    with pytest.raises(FileNotFoundError, match="mini-imagenet-cache-validation.pkl"):
        dm.prepare_data()


def test_explicit_layout_names_missing_files(tmp_path):
    root = write_csv_layout(tmp_path / "data")
    (root / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"Missing for layout 'csv': \[.*test\.csv'\]"):
        make_dm(root, tmp_path, layout="csv").setup()
    with pytest.raises(FileNotFoundError, match=r"(?s)layout='pickle'.*Missing for layout 'pickle'"):
        make_dm(root, tmp_path, layout="pickle").setup()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"layout='zip' is not one of 'auto', 'csv', 'pickle'"):
        make_dm(tmp_path, tmp_path, layout="zip")
    with pytest.raises(ValueError, match=r"image_size=0 must be a positive integer"):
        make_dm(tmp_path, tmp_path, image_size=0)
    with pytest.raises(ValueError, match=r"layout='zip'"):
        find_layout(tmp_path, "zip")


def test_n_way_too_large(tmp_path):
    root = write_pickle_layout(tmp_path / "data")
    with pytest.raises(ValueError, match=r"n_way=3 is larger than the 2 classes of the 'train' split"):
        make_dm(root, tmp_path, n_way=3).setup()


@pytest.mark.parametrize("text", ["", "file,class\na.png,n01\n", "n0100000000.png,n01\n"])
def test_csv_without_header(text, tmp_path):
    root = write_csv_layout(tmp_path / "data")
    (root / "val.csv").write_text(text)
    with pytest.raises(ValueError, match=r"val\.csv has header .* without the columns 'filename' and 'label'.*"
                                         r"a header row 'filename,label'"):
        make_dm(root, tmp_path).setup()


def test_csv_bad_rows(tmp_path):
    root = write_csv_layout(tmp_path / "data")
    (root / "val.csv").write_text("filename,label\n")
    with pytest.raises(ValueError, match=r"val\.csv has no image rows"):
        make_dm(root, tmp_path).setup()
    (root / "val.csv").write_text("filename,label\nn0300000000.png,n03\n\nn0300000001.png\n")
    with pytest.raises(ValueError, match=r"val\.csv line 4 is \['n0300000001\.png'\]: it needs a filename and a label"):
        make_dm(root, tmp_path).setup()


def test_csv_row_with_missing_image(tmp_path):
    root = write_csv_layout(tmp_path / "data")
    (root / "images" / "n0500000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) named in .*test\.csv are missing, e\.g\. "
                                                r"\[.*n0500000002\.png'\]; put them in .*images"):
        make_dm(root, tmp_path).prepare_data()


def test_unreadable_image(tmp_path):
    root = write_csv_layout(tmp_path / "data")
    (root / "images" / "n0200000001.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"n0200000001\.png is not a readable image .*replace it with a good copy "
                                         r"or remove its row from .*train\.csv"):
        make_dm(root, tmp_path).setup()


def write_val_pickle(root: Path, obj) -> None:
    with open(root / mini.PICKLE_FILES["val"], "wb") as f:
        pickle.dump(obj, f)


@pytest.mark.parametrize("obj, match", [
    ({"images": np.zeros((1, SIZE, SIZE, 3), np.uint8), "class_dict": {}},
     r"lacks the keys 'image_data' and 'class_dict' \(found \['class_dict', 'images'\]\)"),
    ([1, 2], r"lacks the keys 'image_data' and 'class_dict' \(found list\)"),
    ({"image_data": np.zeros((2, SIZE, SIZE, 3), np.float32), "class_dict": {"a": [0, 1]}},
     r"'image_data' is a float32 array of shape \(2, 12, 12, 3\), not a uint8 array"),
    ({"image_data": np.zeros((2, SIZE, SIZE, 3), np.uint8), "class_dict": {}}, r"'class_dict' is dict \{\}"),
    ({"image_data": np.zeros((2, SIZE, SIZE, 3), np.uint8), "class_dict": {"a": [0, 2]}},
     r"class 'a' has indices \[0, 2\]; each class needs a non-empty list of integer indices in 0\.\.1"),
    ({"image_data": np.zeros((2, SIZE, SIZE, 3), np.uint8), "class_dict": {"a": []}}, r"class 'a' has indices \[\]"),
])
def test_bad_pickle_content(obj, match, tmp_path):
    root = write_pickle_layout(tmp_path / "data")
    write_val_pickle(root, obj)
    with pytest.raises(ValueError, match=match):
        make_dm(root, tmp_path).setup()
    with pytest.raises(ValueError, match="replace it with learn2learn's mini-imagenet-cache-validation.pkl"):
        make_dm(root, tmp_path).setup()


def test_truncated_pickle(tmp_path):
    root = write_pickle_layout(tmp_path / "data")
    path = root / mini.PICKLE_FILES["test"]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"mini-imagenet-cache-test\.pkl could not be unpickled \(.*\); replace it"):
        make_dm(root, tmp_path).setup()


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"image_data": Exploit(marker), "class_dict": {}})
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global (posix|nt|os)\.system"):
        NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    root = write_pickle_layout(tmp_path / "data")
    (root / mini.PICKLE_FILES["train"]).write_bytes(payload)
    with pytest.raises(ValueError, match=r"mini-imagenet-cache-train\.pkl could not be unpickled .*refusing to load "
                                         r"global (posix|nt|os)\.system"):
        make_dm(root, tmp_path).setup()
    assert not marker.exists()
    for name in ("eval", "exec", "getattr", "__import__"):
        evil = b"cbuiltins\n" + name.encode() + b"\n."
        with pytest.raises(pickle.UnpicklingError, match=f"builtins.{name}"):
            NumpyOnlyUnpickler(io.BytesIO(evil)).load()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_unpickler_reads_numpy_in_every_protocol(protocol):
    obj = {"image_data": np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3),
           "class_dict": {"a": [0, np.int64(1)], "b": range(2), "c": (1,)}}
    out = NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(obj, protocol=protocol))).load()
    assert np.array_equal(out["image_data"], obj["image_data"]) and out["image_data"].dtype == np.uint8
    assert out["class_dict"]["a"] == [0, 1] and list(out["class_dict"]["b"]) == [0, 1]


def test_unpickler_reads_numpy_1_pickles():
    """numpy 1.x pickles name numpy.core.multiarray; they load without importing the deprecated alias."""
    arr = np.arange(6, dtype=np.uint8).reshape(1, 1, 2, 3)
    payload = pickle.dumps({"image_data": arr}, protocol=2)
    assert b"numpy._core.multiarray" in payload
    payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    out = NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    assert np.array_equal(out["image_data"], arr)
