"""Episode sampling: correct tasks, deterministic keys, and the DDP union property."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_meta.datamodules import ClassImageTasks, EpisodeDataset, EpisodeSampler, episode_generator


def coded_images(n_classes: int, n_samples: int) -> torch.Tensor:
    """uint8 images [C, S, 2, 1, 1] whose two channels hold (class, sample): every pixel says where it came from."""
    cls = torch.arange(n_classes)[:, None].expand(n_classes, n_samples)
    smp = torch.arange(n_samples)[None, :].expand(n_classes, n_samples)
    return torch.stack([cls, smp], dim=-1).to(torch.uint8)[..., None, None]


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 0, 0, 0].long(), x[..., 1, 0, 0].long()


def check_episode(ep, n_way, k_shot, k_query):
    t = ep.support_x.shape[0]
    assert ep.support_x.dtype == torch.uint8
    assert ep.support_y.shape == (t, n_way * k_shot) and ep.query_y.shape == (t, n_way * k_query)
    for i in range(t):
        s_cls, s_smp = decode(ep.support_x[i])
        q_cls, q_smp = decode(ep.query_x[i])
        # each label maps to exactly one source class, the same in support and query
        classes = []
        for label in range(n_way):
            cs = s_cls[ep.support_y[i] == label].unique()
            cq = q_cls[ep.query_y[i] == label].unique()
            assert len(cs) == 1 and torch.equal(cs, cq)
            classes.append(int(cs))
            # support and query samples of a class are disjoint and distinct
            ss, qs = s_smp[ep.support_y[i] == label], q_smp[ep.query_y[i] == label]
            assert len(set(ss.tolist()) | set(qs.tolist())) == k_shot + k_query
        assert len(set(classes)) == n_way
        assert sorted(ep.support_y[i].unique().tolist()) == list(range(n_way))


@settings(max_examples=40, deadline=None)
@given(n_way=st.integers(1, 6), k_shot=st.integers(1, 4), k_query=st.integers(1, 4),
       extra_classes=st.integers(0, 5), extra_samples=st.integers(0, 3), n_tasks=st.integers(1, 6),
       seed=st.integers(0, 2**31))
def test_every_task_is_a_valid_episode(n_way, k_shot, k_query, extra_classes, extra_samples, n_tasks, seed):
    images = coded_images(n_way + extra_classes, k_shot + k_query + extra_samples)
    source = ClassImageTasks(images, n_way, k_shot, k_query)
    check_episode(source(episode_generator(seed, 0), n_tasks, slice(None)), n_way, k_shot, k_query)


@settings(max_examples=20, deadline=None)
@given(world_size=st.sampled_from([1, 2, 3, 4]), per_rank=st.integers(1, 4), step=st.integers(0, 100))
def test_union_over_ranks_equals_single_process(world_size, per_rank, step):
    source = ClassImageTasks(coded_images(12, 6), 3, 1, 2)
    meta_batch = world_size * per_rank
    single = EpisodeDataset(source, 7, "train", meta_batch, 10, rank=0, world_size=1)[(0, step)]
    parts = [EpisodeDataset(source, 7, "train", meta_batch, 10, rank=r, world_size=world_size)[(0, step)]
             for r in range(world_size)]
    for field in range(4):
        assert torch.equal(torch.cat([p[field] for p in parts]), single[field])
    if world_size > 1:  # ranks draw different tasks
        assert not torch.equal(parts[0].support_x, parts[1].support_x)


def test_keys_are_deterministic_and_distinct():
    source = ClassImageTasks(coded_images(50, 20), 5, 1, 5)
    ds = EpisodeDataset(source, 3, "train", 8, 10)
    assert torch.equal(ds[(0, 1)].support_x, ds[(0, 1)].support_x)
    assert not torch.equal(ds[(0, 1)].support_x, ds[(0, 2)].support_x)
    assert not torch.equal(ds[(0, 1)].support_x, ds[(1, 1)].support_x)
    other_seed = EpisodeDataset(source, 4, "train", 8, 10)
    assert not torch.equal(ds[(0, 1)].support_x, other_seed[(0, 1)].support_x)
    val = EpisodeDataset(source, 3, "val", 8, 10)
    assert not torch.equal(ds[(0, 1)].support_x, val[(0, 1)].support_x)


def test_sampler_epochs():
    train, fixed = EpisodeSampler(3), EpisodeSampler(3, fixed=True)
    assert list(train) == [(0, 0), (0, 1), (0, 2)] and len(train) == 3
    train.set_epoch(2)
    fixed.set_epoch(2)
    assert list(train) == [(2, 0), (2, 1), (2, 2)]
    assert list(fixed) == [(0, 0), (0, 1), (0, 2)]


def test_meta_batch_must_divide_over_ranks():
    source = ClassImageTasks(coded_images(10, 5), 2, 1, 1)
    with pytest.raises(ValueError, match=r"meta_batch_size=5 \(train\) does not divide over 2 processes"):
        EpisodeDataset(source, 0, "train", 5, 10, rank=0, world_size=2)


def test_images_must_be_5d():
    with pytest.raises(ValueError, match=r"\[n_classes, n_samples, C, H, W\]"):
        ClassImageTasks(torch.zeros(3, 4, 5, dtype=torch.uint8), 2, 1, 1)


class _Keys(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, key):
        return key


@settings(max_examples=30, deadline=None)
@given(n_steps=st.integers(1, 12), epoch=st.integers(0, 5), stop=st.integers(0, 12))
def test_episode_loader_resumes_where_its_state_says(n_steps, epoch, stop):
    from lit_meta.datamodules.sampler import EpisodeLoader

    stop = min(stop, n_steps)
    first = EpisodeLoader(_Keys(), EpisodeSampler(n_steps))
    first.sampler.set_epoch(epoch)
    iterator = iter(first)
    served = [tuple(next(iterator)) for _ in range(stop)]  # the batches a killed run had trained on
    state = first.state_dict() if served else {"epoch": epoch, "served": 0}
    resumed = EpisodeLoader(_Keys(), EpisodeSampler(n_steps))
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(epoch)  # what Lightning does after restoring, before the first batch
    rest = [tuple(key) for key in resumed]
    if stop == n_steps:  # a finished epoch: the next iteration is a whole epoch
        assert rest == [(epoch, s) for s in range(n_steps)]
    else:
        assert served + rest == [(epoch, s) for s in range(n_steps)]
    other_epoch = EpisodeLoader(_Keys(), EpisodeSampler(n_steps))
    other_epoch.load_state_dict(state)
    other_epoch.sampler.set_epoch(epoch + 1)  # a state from another epoch never skips batches
    assert len(list(other_epoch)) == n_steps
