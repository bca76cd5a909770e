"""Learn2LearnDataModule: episodes from learn2learn task datasets (needs learn2learn)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

pytestmark = pytest.mark.l2l
l2l = pytest.importorskip("learn2learn")

import lightning as L  # noqa: E402

import lit_meta  # noqa: E402
from lit_meta.datamodules import EpisodeDataset  # noqa: E402
from lit_meta.datamodules.learn2learn import Learn2LearnDataModule, Learn2LearnTasks  # noqa: E402
from lit_meta.episode import Episode  # noqa: E402

N_CLASSES, N_SAMPLES = 10, 20
N, K, Q = 5, 2, 3


def make_meta() -> "l2l.data.MetaDataset":
    """10 classes x 20 samples of 1x8x8 uint8 images; pixel value = class * 20 + sample (unique per image)."""
    codes = torch.arange(N_CLASSES * N_SAMPLES, dtype=torch.uint8)
    x = codes.view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()
    y = torch.arange(N_CLASSES).repeat_interleave(N_SAMPLES)
    return l2l.data.MetaDataset(TensorDataset(x, y))


def make_tasks(meta, n: int = N, shots: int = K + Q, remap: bool = True, num_tasks: int = -1, cls=None):
    t, cls = l2l.data.transforms, cls or l2l.data.Taskset
    transforms = [t.NWays(meta, n), t.KShots(meta, shots), t.LoadData(meta)]
    if remap:
        transforms += [t.RemapLabels(meta), t.ConsecutiveLabels(meta)]
    return cls(meta, task_transforms=transforms, num_tasks=num_tasks)


@pytest.fixture(scope="module")
def meta():
    return make_meta()


def make_dm(train, val=None, test=None, **kwargs) -> Learn2LearnDataModule:
    kwargs = {"meta_batch_size": 4, "steps_per_epoch": 3, "eval_episodes": 4, "eval_meta_batch_size": 2,
              "seed": 7, **kwargs}
    return Learn2LearnDataModule(train, val, test, n_way=N, k_shot=K, k_query=Q, **kwargs)


def codes(images: torch.Tensor) -> torch.Tensor:
    return images[..., 0, 0, 0].long()  # [T, M]: class * 20 + sample


def check_episode(ep: Episode, t: int) -> None:
    assert ep.support_x.shape == (t, N * K, 1, 8, 8) and ep.query_x.shape == (t, N * Q, 1, 8, 8)
    assert ep.support_x.dtype == torch.uint8 and ep.query_x.dtype == torch.uint8
    assert ep.support_y.dtype == torch.int64 and ep.query_y.dtype == torch.int64
    assert torch.equal(ep.support_y, torch.arange(N).repeat_interleave(K).expand(t, -1))
    assert torch.equal(ep.query_y, torch.arange(N).repeat_interleave(Q).expand(t, -1))
    s, q = codes(ep.support_x), codes(ep.query_x)
    for i in range(t):
        assert len(set(s[i].tolist()) | set(q[i].tolist())) == N * (K + Q)  # support and query disjoint samples
        s_cls, q_cls = s[i].view(N, K) // N_SAMPLES, q[i].view(N, Q) // N_SAMPLES
        # every example labelled j comes from one original class, the same in support and query
        assert (s_cls == s_cls[:, :1]).all() and (q_cls == s_cls[:, :1]).all()
        assert len(set(s_cls[:, 0].tolist())) == N


@pytest.mark.parametrize("remap", [True, False])
def test_episode_format(meta, remap):
    dm = make_dm(make_tasks(meta, remap=remap))
    ep = dm.dataset("train")[(0, 0)]
    check_episode(ep, 4)


@pytest.mark.filterwarnings("ignore:TaskDataset is deprecated:DeprecationWarning")
def test_accepts_task_dataset_class(meta):
    check_episode(make_dm(make_tasks(meta, cls=l2l.data.TaskDataset)).dataset("train")[(0, 0)], 4)


def test_meta_dataset_builds_standard_transforms(meta):
    dm = make_dm(meta, meta, meta)
    for split in ("train", "val", "test"):
        check_episode(dm.dataset(split)[(0, 0)], 4 if split == "train" else 2)


def test_deterministic_and_varies_with_step(meta):
    a = make_dm(make_tasks(meta)).dataset("train")
    b = make_dm(make_tasks(meta)).dataset("train")  # a fresh TaskDataset: nothing carried over
    for x, y in zip(a[(0, 1)], b[(0, 1)]):
        assert torch.equal(x, y)
    assert not torch.equal(a[(0, 1)].support_x, a[(0, 2)].support_x)
    assert not torch.equal(a[(0, 1)].support_x, a[(1, 1)].support_x)
    other_seed = make_dm(make_tasks(meta), seed=8).dataset("train")
    assert not torch.equal(a[(0, 1)].support_x, other_seed[(0, 1)].support_x)


@pytest.mark.parametrize("num_tasks", [-1, 6])
def test_rank_slices_union_equals_single_process(meta, num_tasks):
    source = Learn2LearnTasks(make_tasks(meta, num_tasks=num_tasks), N, K, Q, pool_seed=3)
    whole = EpisodeDataset(source, 5, "train", 8, 2)[(1, 1)]
    for world in (2, 4):
        # each rank in its own process: a fresh TaskDataset (own description cache) per rank
        parts = [EpisodeDataset(Learn2LearnTasks(make_tasks(meta, num_tasks=num_tasks), N, K, Q, pool_seed=3),
                                5, "train", 8, 2, rank, world)[(1, 1)] for rank in reversed(range(world))][::-1]
        for field, full in zip(Episode._fields, whole):
            assert torch.equal(torch.cat([getattr(p, field) for p in parts]), full), field


def test_rank_from_trainer(meta):
    class FakeTrainer:
        global_rank, world_size = 1, 2

    dm = make_dm(make_tasks(meta))
    whole = dm.dataset("train")[(0, 0)]
    dm.trainer = FakeTrainer()
    part = dm.dataset("train")[(0, 0)]
    assert torch.equal(part.support_x, whole.support_x[2:]) and torch.equal(part.query_x, whole.query_x[2:])


def test_global_rng_state_unchanged(meta):
    dataset = make_dm(make_tasks(meta)).dataset("train")
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    dataset[(0, 0)]
    assert random.getstate() == states[0]
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(after, states[1]))
    assert torch.equal(torch.get_rng_state(), states[2])


@pytest.mark.parametrize("n, shots", [(4, K + Q), (N, K + Q + 1)])
def test_wrong_ways_or_shots_raise(meta, n, shots):
    dataset = make_dm(make_tasks(meta, n=n, shots=shots)).dataset("train")
    with pytest.raises(ValueError, match=r"must draw n_way classes with k_shot \+ k_query samples each") as info:
        dataset[(0, 0)]
    assert f"has {n} classes with [{shots}] examples per class" in str(info.value)


def test_bad_arguments(meta):
    with pytest.raises(TypeError, match="MetaDataset"):
        make_dm(TensorDataset(torch.zeros(3)))
    with pytest.raises(ValueError, match="n_way=11 is larger than the 10 classes"):
        Learn2LearnDataModule(meta, n_way=11)
    with pytest.raises(ValueError, match="k_shot \\+ k_query = 1 \\+ 20 = 21 is larger than the 20 samples"):
        Learn2LearnDataModule(meta, k_query=20)
    with pytest.raises(ValueError, match="train_tasks is required"):
        Learn2LearnDataModule(None)


def test_missing_split_raises(meta):
    dm = make_dm(meta)
    with pytest.raises(RuntimeError, match="no 'val' tasks: pass val_tasks="):
        dm.val_dataloader()
    with pytest.raises(RuntimeError, match="no 'test' tasks: pass test_tasks="):
        dm.test_dataloader()


def test_imports_without_learn2learn(monkeypatch):
    """The module imports without learn2learn; constructing the DataModule says how to install it."""
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # makes `import learn2learn` raise ImportError
    path = Path(sys.modules[Learn2LearnDataModule.__module__].__file__)
    spec = importlib.util.spec_from_file_location("lit_meta.datamodules._learn2learn_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ImportError, match="bash scripts/install_learn2learn.sh"):
        module.Learn2LearnDataModule(object())


def test_fit(meta):
    dm = make_dm(make_tasks(meta), meta, meta_batch_size=2)
    model = lit_meta.FineTune(net=lit_meta.Conv4(out_features=N, hidden=8), inner_steps=1)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 0 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2
