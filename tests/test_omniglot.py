"""OmniglotDataModule on the real (minimal) Omniglot files: splits, cache, episodes, bad input."""

import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_meta.datamodules import OmniglotDataModule
from lit_meta.datamodules import omniglot as omni
from lit_meta.datamodules.files import download, md5sum


@pytest.fixture(scope="module")
def dm(omniglot_dir, tmp_path_factory):
    dm = OmniglotDataModule(data_dir=str(omniglot_dir), cache_dir=str(tmp_path_factory.mktemp("cache")))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_minimal_data_loads_all_242_characters(dm):
    total = sum(len(chars) for chars in dm.split_characters.values())
    assert total == 242
    for split, images in dm.split_images.items():
        assert images.dtype == torch.uint8
        assert images.shape[1:] == (20, 1, 28, 28)
        assert images.shape[0] == 4 * len(dm.split_characters[split])  # x4 rotations
    # strokes bright on a dark background
    assert dm.split_images["train"].float().mean() < 60


def test_character_split_is_disjoint_and_proportional(dm):
    sets = {s: set(c) for s, c in dm.split_characters.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    n = {s: len(c) for s, c in sets.items()}
    assert n == {"train": 164, "val": 15, "test": 63}  # 1200/100/423 of 1623, scaled to 242


def test_alphabet_split_holds_out_whole_alphabets(omniglot_dir, tmp_path):
    dm = OmniglotDataModule(data_dir=str(omniglot_dir), split="alphabets", cache_dir=str(tmp_path))
    dm.setup()
    alphabets = {s: {a for a, _ in chars} for s, chars in dm.split_characters.items()}
    assert not (alphabets["train"] & alphabets["val"]) and not (alphabets["train"] & alphabets["test"])
    assert not (alphabets["val"] & alphabets["test"])
    assert [len(alphabets[s]) for s in ("train", "val", "test")] == [5, 1, 2]
    assert len(set().union(*alphabets.values())) == 8


def test_split_is_seeded(omniglot_dir, tmp_path):
    a = OmniglotDataModule(data_dir=str(omniglot_dir), cache_dir=str(tmp_path))
    b = OmniglotDataModule(data_dir=str(omniglot_dir), cache_dir=str(tmp_path))
    c = OmniglotDataModule(data_dir=str(omniglot_dir), cache_dir=str(tmp_path), split_seed=1)
    for d in (a, b, c):
        d.setup()
    assert a.split_characters == b.split_characters != c.split_characters


def test_rotations_are_classes_of_the_same_character(dm):
    images = dm.split_images["train"]
    assert torch.equal(images[1], torch.rot90(images[0], 1, dims=(-2, -1)))
    assert torch.equal(images[3], torch.rot90(images[0], 3, dims=(-2, -1)))


def test_cache_is_reused(omniglot_dir, tmp_path, monkeypatch):
    OmniglotDataModule(data_dir=str(omniglot_dir), cache_dir=str(tmp_path)).prepare_data()
    assert len(list(tmp_path.glob("omniglot-28px-*.pt"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of loading the cache")

    monkeypatch.setattr(omni, "decode_zips", fail)
    dm = OmniglotDataModule(data_dir=str(omniglot_dir), cache_dir=str(tmp_path))
    dm.setup()
    assert dm.split_images["train"].shape[0] == 4 * 164


def test_image_size_is_configurable(omniglot_dir, tmp_path):
    dm = OmniglotDataModule(data_dir=str(omniglot_dir), cache_dir=str(tmp_path), image_size=14, rotations=1)
    dm.setup()
    assert dm.split_images["train"].shape == (164, 20, 1, 14, 14)


def test_batches_are_uint8_episodes_and_same_seed_same_batches(omniglot_dir, tmp_path):
    def first_batches(seed):
        dm = OmniglotDataModule(data_dir=str(omniglot_dir), cache_dir=str(tmp_path), meta_batch_size=4,
                                n_way=5, k_shot=1, k_query=15, seed=seed)
        dm.setup()
        it = iter(dm.train_dataloader())
        return [next(it) for _ in range(2)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    ep = a[0]
    assert ep.support_x.shape == (4, 5, 1, 28, 28) and ep.query_x.shape == (4, 75, 1, 28, 28)
    assert ep.support_x.dtype == torch.uint8 and ep.support_y.dtype == torch.int64
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert not torch.equal(a[0].support_x, a[1].support_x)
    assert not torch.equal(a[0].support_x, c[0].support_x)


def test_validation_set_is_fixed(dm):
    first = [b.support_x for b in dm.val_dataloader()]
    loader = dm.val_dataloader()
    loader.sampler.set_epoch(5)
    second = [b.support_x for b in loader]
    assert len(first) == 600 // 20 and all(torch.equal(x, y) for x, y in zip(first, second))


# ---------------------------------------------------------------- bad input: each names value, limit, fix

def test_missing_data_says_which_files_to_put_where(tmp_path):
    dm = OmniglotDataModule(data_dir=str(tmp_path / "nothing"), download=False, cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"not found in .*nothing\. Put images_background\.zip \+ images_evaluation\.zip"):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match="not found in"):
        dm.setup()


def test_missing_minimal_variant_is_not_downloaded(tmp_path):
    dm = OmniglotDataModule(data_dir=str(tmp_path), variant="minimal", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="images_background_small1.zip"):
        dm.prepare_data()


def _copy_minimal(omniglot_dir: Path, dest: Path) -> None:
    dest.mkdir()
    for name in omni.MINIMAL:
        shutil.copy(omniglot_dir / name, dest / name)


def test_truncated_zip(omniglot_dir, tmp_path):
    data = tmp_path / "data"
    _copy_minimal(omniglot_dir, data)
    path = data / "images_background_small1.zip"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    dm = OmniglotDataModule(data_dir=str(data), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"images_background_small1\.zip is not a readable zip.*truncated.*fresh copy"):
        dm.prepare_data()
    assert path.exists()  # the user's file is never deleted


def test_unreadable_png(omniglot_dir, tmp_path):
    data = tmp_path / "data"
    _copy_minimal(omniglot_dir, data)
    path = data / "images_background_small2.zip"
    with zipfile.ZipFile(omniglot_dir / path.name) as src, zipfile.ZipFile(path, "w") as dst:
        names = src.namelist()
        bad = next(n for n in names if n.endswith(".png") and "Tagalog" in n)
        for name in names:
            dst.writestr(name, b"not a png" if name == bad else src.read(name))
    dm = OmniglotDataModule(data_dir=str(data), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=rf"{bad}.* is not a readable PNG.*replace images_background_small2\.zip"):
        dm.prepare_data()


@pytest.mark.parametrize("evil", ["../../outside.png", "/etc/outside.png", "images_background_small2/../../x/y.png",
                                  "C:/outside.png"])
def test_archive_with_an_entry_escaping_the_folder_is_refused(omniglot_dir, tmp_path, evil):
    data = tmp_path / "data"
    _copy_minimal(omniglot_dir, data)
    path = data / "images_background_small2.zip"
    with zipfile.ZipFile(path, "a") as dst:
        dst.writestr(evil, b"x")
    dm = OmniglotDataModule(data_dir=str(data), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"images_background_small2\.zip has an unsafe entry .*escape the target folder"):
        dm.prepare_data()
    assert path.exists() and not (tmp_path / "outside.png").exists()


def test_n_way_larger_than_split(omniglot_dir, tmp_path):
    dm = OmniglotDataModule(data_dir=str(omniglot_dir), cache_dir=str(tmp_path), n_way=100)
    with pytest.raises(ValueError, match=r"n_way=100 is larger than the 60 classes of the 'val' split; use n_way <= 60"):
        dm.setup()


def test_shots_larger_than_samples(omniglot_dir, tmp_path):
    dm = OmniglotDataModule(data_dir=str(omniglot_dir), cache_dir=str(tmp_path), k_shot=5, k_query=16)
    with pytest.raises(ValueError, match=r"k_shot \+ k_query = 5 \+ 16 = 21 is larger than the 20 samples.*<= 20"):
        dm.setup()


@pytest.mark.parametrize("kwargs, message", [
    ({"n_way": 0}, r"n_way=0 must be a positive integer"),
    ({"k_shot": -1}, r"k_shot=-1 must be a positive integer"),
    ({"k_query": 0}, r"k_query=0 must be a positive integer"),
    ({"meta_batch_size": 0}, r"meta_batch_size=0 must be a positive integer"),
    ({"image_size": 0}, r"image_size=0 must be a positive integer"),
    ({"split": "random"}, r"split='random' is not one of 'characters', 'alphabets'"),
    ({"variant": "small"}, r"variant='small' is not one of"),
    ({"rotations": 5}, r"rotations=5 must be between 1"),
    ({"eval_meta_batch_size": 7}, r"eval_meta_batch_size=7 must divide eval_episodes=600"),
    ({"split_sizes": (200, 30, 30)}, r"split_sizes=\(200, 30, 30\) must be three positive counts of characters.*242"),
])
def test_bad_arguments_fail_before_training(omniglot_dir, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        dm = OmniglotDataModule(data_dir=str(omniglot_dir), cache_dir=str(tmp_path), **kwargs)
        dm.setup()


def test_unknown_split_name_for_dataset(dm):
    with pytest.raises(ValueError, match=r"split='training' is not one of \('train', 'val', 'test'\)"):
        dm.dataset("training")


# ---------------------------------------------------------------- downloads

def test_download_verifies_checksum(omniglot_dir, tmp_path):
    src = omniglot_dir / "images_background_small1.zip"
    dest = tmp_path / "dl" / "file.zip"
    download(src.as_uri(), dest, md5sum(src))
    assert md5sum(dest) == omni.MINIMAL[src.name]


def test_download_mismatch_deletes_the_partial_file(omniglot_dir, tmp_path):
    src = omniglot_dir / "images_background_small1.zip"
    dest = tmp_path / "dl" / "file.zip"
    with pytest.raises(OSError, match="checksum mismatch.*partial download was deleted"):
        download(src.as_uri(), dest, "0" * 32)
    assert list((tmp_path / "dl").iterdir()) == []


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(omni, "URL", (tmp_path / "no-such-server").as_uri() + "/")
    dm = OmniglotDataModule(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"(?s)not found in.*The download failed"):
        dm.prepare_data()
