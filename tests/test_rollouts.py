"""Replay buffer, rollout collection and RolloutDataModule: windows stay inside one rollout and one task,
collection is seeded per rollout, checkpoints restore exactly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_meta.datamodules.rollouts import RolloutDataModule
from lit_meta.episode import Transitions, Window
from lit_meta.rl import Rollout, RolloutBuffer, RolloutCollector
from lit_meta.rl.buffer import segment_ids
from rl_fakes import ENV_ID


def make_rollout(length: int, change_at: list[int], rollout_id: float, seed: int = 0) -> Rollout:
    """A rollout whose obs encode (rollout id, step) and whose task changes at the given steps."""
    step = torch.arange(length, dtype=torch.float32)
    obs = torch.stack([torch.full_like(step, rollout_id), step], dim=1)
    next_obs = torch.stack([torch.full_like(step, rollout_id), step + 1], dim=1)
    task = torch.zeros(length, 1)
    for at in change_at:
        task[at:] += 1
    return Rollout(obs, step[:, None], next_obs, -step, torch.zeros(length, dtype=torch.bool), task, seed)


def test_segment_ids():
    task = torch.tensor([[0.0], [0.0], [1.0], [1.0], [0.0]])
    assert segment_ids(task).tolist() == [0, 0, 1, 1, 2]
    assert segment_ids(torch.zeros(3, 0)).tolist() == [0, 0, 0]


@settings(max_examples=40, deadline=None)
@given(rollouts=st.lists(st.tuples(st.integers(1, 40), st.lists(st.integers(1, 39), max_size=3)), min_size=1, max_size=6),
       window=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_windows_never_cross_a_rollout_or_a_task(rollouts, window, seed):
    buffer = RolloutBuffer(capacity=1000, window=window)
    data = [make_rollout(n, [c for c in changes if c < n], i) for i, (n, changes) in enumerate(rollouts)]
    buffer.add(data)
    # Every valid window, counted by hand: runs of one task of length >= window.
    expected = 0
    for r in data:
        seg = segment_ids(r.task_vector)
        expected += sum(max(int((seg == s).sum()) - window + 1, 0) for s in seg.unique())
    assert buffer.n_windows == expected
    if not expected:
        with pytest.raises(ValueError, match="as long as a window"):
            buffer.sample_windows(4, torch.Generator().manual_seed(seed), 1)
        return
    past = max(window // 2, 1) if window > 1 else 1
    w = buffer.sample_windows(64, torch.Generator().manual_seed(seed), past)
    obs = torch.cat([w.past_obs, w.future_obs], dim=1)
    action = torch.cat([w.past_action, w.future_action], dim=1)
    assert obs.shape == (64, window, 2) and w.past_obs.shape[1] == past
    assert (obs[:, :, 0] == obs[:, :1, 0]).all(), "a window spans two rollouts"
    assert (obs[:, 1:, 1] - obs[:, :-1, 1] == 1).all(), "steps are not consecutive"
    assert (torch.cat([w.past_next_obs, w.future_next_obs], 1)[:, :, 1] == obs[:, :, 1] + 1).all()
    assert (action[:, :, 0] == obs[:, :, 1]).all()
    for rid, start in zip(obs[:, 0, 0].long().tolist(), obs[:, 0, 1].long().tolist()):
        task = data[rid].task_vector[start:start + window]
        assert (task == task[0]).all(), "a window spans two tasks"


def test_buffer_state_dict_roundtrip_and_weights_only():
    buffer = RolloutBuffer(capacity=500, window=4)
    buffer.add([make_rollout(30, [10], 0), make_rollout(20, [], 1)])
    saved = io.BytesIO()
    torch.save(buffer.state_dict(), saved)
    saved.seek(0)
    restored = RolloutBuffer(capacity=500, window=4)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    assert len(restored) == 50 and restored.n_rollouts == 2 and restored.n_segments == 3
    a = buffer.sample_windows(8, torch.Generator().manual_seed(3), 2)
    b = restored.sample_windows(8, torch.Generator().manual_seed(3), 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    restored.add([make_rollout(5, [], 2)])
    assert restored.data("rollout")[-1] == 2 and restored.data("segment")[-1] == 3
    with pytest.raises(ValueError, match="capacity=500, window=4"):
        RolloutBuffer(capacity=100, window=4).load_state_dict(buffer.state_dict())


def test_buffer_refuses_overflow_and_non_finite():
    buffer = RolloutBuffer(capacity=10, window=2)
    with pytest.raises(ValueError, match="capacity=10"):
        buffer.add([make_rollout(11, [], 0)])
    bad = make_rollout(5, [], 0)._replace(next_obs=torch.full((5, 2), float("nan")))
    with pytest.raises(ValueError, match="non-finite next_obs"):
        buffer.add([bad])
    assert len(buffer) == 0


def test_buffer_stats_and_transitions():
    buffer = RolloutBuffer(capacity=100, window=2)
    buffer.add([make_rollout(10, [], 0), make_rollout(6, [], 1)])
    stats = buffer.stats()
    obs = buffer.data("obs").double().numpy()
    np.testing.assert_allclose(stats["obs_mean"], obs.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["obs_std"], np.maximum(obs.std(0), 1e-6), rtol=1e-6)
    np.testing.assert_allclose(stats["delta_mean"], [0.0, 1.0])
    batch = buffer.sample_transitions(7, torch.Generator().manual_seed(0))
    assert isinstance(batch, Transitions) and batch.obs.shape == (7, 2)
    assert (batch.next_obs[:, 1] == batch.obs[:, 1] + 1).all()


# -- collection ------------------------------------------------------------------------------------
def test_collection_is_seeded_per_rollout_not_per_batch():
    one = RolloutCollector(ENV_ID, {"change_every": 7}, n_envs=1)
    three = RolloutCollector(ENV_ID, {"change_every": 7}, n_envs=3)
    a = one.collect(one.random_policy(), seed=5, round=1, indices=[0, 1, 2, 3], rollout_length=30)
    b = three.collect(three.random_policy(), seed=5, round=1, indices=[0, 1, 2, 3], rollout_length=30)
    c = three.collect(three.random_policy(), seed=5, round=1, indices=[2], rollout_length=30)
    assert [r.length for r in a] == [30] * 4
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x[:6], y[:6])) and x.seed == y.seed
    assert torch.equal(a[2].obs, c[0].obs)
    assert not torch.equal(a[0].obs, a[1].obs)
    other_round = one.collect(one.random_policy(), seed=5, round=2, indices=[0], rollout_length=30)
    assert not torch.equal(other_round[0].obs, a[0].obs)
    # The transitions chain, and each is stamped with the task it ran under: x' = x + a + c.
    for r in a:
        assert torch.equal(r.obs[1:], r.next_obs[:-1])
        torch.testing.assert_close(r.next_obs[:, 0], r.obs[:, 0] + r.action[:, 0] + r.task_vector[:, 0])
    assert any(len(segment_ids(r.task_vector).unique()) > 1 for r in a), "change_every=7 never changed the task"


def test_episode_end_and_unstable_physics_end_the_rollout_without_nan(caplog):
    collector = RolloutCollector(ENV_ID, {"max_steps": 12}, n_envs=2)
    rollouts = collector.collect(collector.random_policy(), 0, 0, [0, 1], rollout_length=50)
    assert [r.length for r in rollouts] == [12, 12]

    def policy(obs):  # blows up env 0 at its 5th step, sends NaN to env 1 at its 3rd
        action = np.zeros((len(obs), 1), dtype=np.float32)
        action[0] = 5.0 if obs[0, 1] == 4 else 0.0
        action[1] = np.nan if obs[1, 1] == 2 else 0.0
        return action

    with caplog.at_level("WARNING", logger="lit_meta.rl.collect"):
        bad = collector.collect(policy, 0, 0, [0, 1], rollout_length=50)
    assert [r.length for r in bad] == [4, 2]
    assert all(torch.isfinite(r.next_obs).all() and torch.isfinite(r.action).all() for r in bad)
    assert collector.n_unstable == 2
    assert "test blow-up" in caplog.text and "non-finite action" in caplog.text


# -- DataModule ------------------------------------------------------------------------------------
def drift_datamodule(**kwargs) -> RolloutDataModule:
    args = dict(env_id=ENV_ID, env_kwargs={"change_every": 20}, past_window=4, future_window=3,
                initial_rollouts=3, rollouts_per_round=2, rollout_length=40, val_rollouts=2, n_envs=2,
                meta_batch_size=8, steps_per_epoch=3, eval_episodes=6, eval_meta_batch_size=3, seed=11)
    return RolloutDataModule(**{**args, **kwargs})


def test_datamodule_windows_transitions_and_aggregation():
    dm = drift_datamodule()
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Window)
    assert batch.past_obs.shape == (8, 4, 2) and batch.future_next_obs.shape == (8, 3, 2)
    assert batch.past_action.shape == (8, 4, 1) and batch.past_obs.dtype == torch.float32
    assert len(dm.buffer) == 3 * 40 and dm.round == 1
    val = list(dm.val_dataloader())
    assert len(val) == 2 and (val[0].past_obs[:, 0, 0] != 0).any()
    # Held-out split: every validation window comes from the test task (c = 2).
    assert set(dm.val_buffer.data("task_vector")[:, 0].tolist()) == {2.0}
    assert set(dm.buffer.data("task_vector")[:, 0].tolist()) == {0.0, 3.0}
    # Same (seed, epoch, step) -> the same windows; the validation set is fixed.
    again = next(iter(dm.train_dataloader()))
    assert all(torch.equal(x, y) for x, y in zip(batch, again))
    assert all(torch.equal(x, y) for x, y in zip(val[0], next(iter(dm.val_dataloader()))))

    def push_right(obs):
        return np.ones((len(obs), 1), dtype=np.float32)

    dm.aggregate(push_right)
    assert dm.round == 2 and len(dm.buffer) == 5 * 40
    assert (dm.buffer.data("action")[-80:] == 1).all()
    torch.testing.assert_close(dm.stats["obs_mean"], dm.buffer.data("obs").double().mean(0).float())

    transitions = next(iter(drift_datamodule(batch_type="transitions", meta_batch_size=16).train_dataloader()))
    assert isinstance(transitions, Transitions) and transitions.obs.shape == (16, 2)


def test_datamodule_state_dict_resumes_exactly():
    dm = drift_datamodule()
    dm.train_dataloader()
    dm.aggregate(None)
    saved = io.BytesIO()
    torch.save(dm.state_dict(), saved)
    saved.seek(0)
    resumed = drift_datamodule()
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert resumed.round == 2
    a, b = next(iter(dm.train_dataloader())), next(iter(resumed.train_dataloader()))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(resumed.buffer) == len(dm.buffer)  # the restored module did not collect again
    dm.aggregate(None)
    resumed.aggregate(None)  # the next round continues the same seeds
    assert torch.equal(dm.buffer.data("obs"), resumed.buffer.data("obs"))


def test_datamodule_bad_arguments():
    with pytest.raises(ValueError, match="past_window=0"):
        drift_datamodule(past_window=0)
    with pytest.raises(ValueError, match="batch_type='episodes'"):
        drift_datamodule(batch_type="episodes")
    with pytest.raises(ValueError, match="num_workers=2"):
        drift_datamodule(num_workers=2)
    with pytest.raises(ValueError, match="longer than rollout_length=5"):
        drift_datamodule(rollout_length=5)
    with pytest.raises(ValueError, match="as long as a window"):
        next(iter(drift_datamodule(env_kwargs={"max_steps": 5}).train_dataloader()))


@pytest.mark.parametrize("env_id", ["lit_meta/HalfCheetahCrippledJoint-v0", "lit_meta/AntCrippledLeg-v0"])
def test_real_env_rollouts_store_the_env_reward_and_task_segments(env_id):
    import lit_meta.envs

    dm = RolloutDataModule(env_id=env_id, env_kwargs={"change_every": 30}, past_window=8, future_window=8,
                           initial_rollouts=2, rollout_length=100, val_rollouts=1, n_envs=2, meta_batch_size=4,
                           steps_per_epoch=1, eval_episodes=4, eval_meta_batch_size=4, seed=0)
    window = next(iter(dm.train_dataloader()))
    obs_dim = 18 if "Cheetah" in env_id else 107
    assert window.past_obs.shape == (4, 8, obs_dim) and window.future_action.shape[1] == 8
    buffer = dm.buffer
    reward = lit_meta.envs.reward_fn(env_id)(buffer.data("obs").double(), buffer.data("action").double(),
                                             buffer.data("next_obs").double())
    torch.testing.assert_close(reward.float(), buffer.data("reward"), atol=2e-3, rtol=1e-4)  # obs stored as float32
    assert buffer.n_segments > buffer.n_rollouts or len(buffer) < 200  # change_every=30 split the rollouts
    assert torch.isfinite(buffer.data("next_obs")).all()
