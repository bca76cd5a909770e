"""TrueDynamics against the envs' own steps, and the model-quality diagnostics against known answers."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import lit_meta.envs  # noqa: F401
from lit_meta.rl import MBMPC, RolloutCollector, TrueDynamics, evaluate, random_shooting
from lit_meta.rl.diagnostics import candidate_ranking, candidate_returns, open_loop_errors, spearman

CHEETAH = "lit_meta/HalfCheetahCrippledJoint-v0"


def vector(env_id: str, n: int, **kwargs):
    envs = gym.make_vec(env_id, num_envs=n, vectorization_mode="sync", **kwargs)
    obs, _ = envs.reset(seed=list(range(n)))
    rng = np.random.default_rng(0)
    for _ in range(5):  # away from the initial state
        obs, *_ = envs.step(rng.uniform(-1, 1, (n, *envs.single_action_space.shape)))
    return envs, obs


@pytest.mark.parametrize("env_id,kwargs", [
    (CHEETAH, {"task_split": "test"}),                  # fast path: mujoco.rollout
    ("lit_meta/HalfCheetahPier-v0", {}),                # fast path with the pier's floating blocks in the state
    ("lit_meta/AntCrippledLeg-v0", {"task_split": "test"}),  # generic path: MjData copies + the env's _get_obs
], ids=["cheetah", "pier", "ant"])
def test_candidates_follow_the_env_exactly(env_id, kwargs):
    """Two env steps of candidate 0 of each env equal what the envs themselves do with those actions."""
    envs, obs = vector(env_id, 2, **kwargs)
    model = TrueDynamics(envs, n_threads=2)
    A, n, horizon = envs.single_action_space.shape[0], 3, 2
    actions = torch.as_tensor(np.random.default_rng(1).uniform(-1, 1, (horizon, 2, n, A)), dtype=torch.float32)
    step = model.dynamics(horizon)
    x = torch.as_tensor(obs, dtype=torch.float32).repeat_interleave(n, 0)  # environment-major rows
    predicted = []
    for h in range(horizon):
        x = step(x, actions[h].reshape(2 * n, A))
        predicted.append(x.view(2, n, -1))
    for h in range(horizon):
        real, *_ = envs.step(actions[h, :, 0].double().numpy())
        torch.testing.assert_close(predicted[h][:, 0], torch.as_tensor(real, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    # the other candidates took other actions: other states
    assert not torch.allclose(predicted[-1][:, 0], predicted[-1][:, 1])
    envs.close()


def test_the_current_task_is_honoured_and_each_iteration_restarts():
    """A crippled joint's action changes nothing; the (horizon + 1)-th call starts again from the env's state."""
    envs, obs = vector(CHEETAH, 1, task_split="test")
    joint = envs.envs[0].unwrapped.get_task()["crippled_joint"]
    j = ("bthigh", "bshin", "bfoot", "fthigh", "fshin", "ffoot").index(joint)
    a = torch.zeros(2, 6)
    a[1, j] = 1.0  # the second candidate pushes only the crippled joint
    x = torch.as_tensor(obs, dtype=torch.float32).expand(2, -1)
    step = TrueDynamics(envs).dynamics(horizon=1)
    first = step(x, a)
    torch.testing.assert_close(first[0], first[1])
    again = step(x, torch.ones(2, 6))  # a new iteration: from the env's state again, not from `first`
    real, *_ = envs.step(np.ones((1, 6)))
    torch.testing.assert_close(again[0], torch.as_tensor(real[0], dtype=torch.float32), rtol=1e-5, atol=1e-5)
    envs.close()


def test_misuse_is_refused():
    with pytest.raises(ValueError, match="n_threads"):
        TrueDynamics(n_threads=0)
    with pytest.raises(ValueError, match="no envs"):
        TrueDynamics().dynamics(3)
    envs, obs = vector(CHEETAH, 1)
    with pytest.raises(ValueError, match="horizon"):
        TrueDynamics(envs).dynamics(0)
    with pytest.raises(ValueError, match="not the envs' current states"):
        TrueDynamics(envs).dynamics(2)(torch.zeros(4, 18), torch.zeros(4, 6))
    envs.close()
    with pytest.raises(ValueError, match="MuJoCo"):
        TrueDynamics([gym.make("CartPole-v1")])


def test_true_dynamics_planner_runs_the_cheetah_forward():
    """The planner on the true dynamics moves the crippled cheetah forward; random actions do not."""
    result = evaluate(TrueDynamics(), CHEETAH, "test", episodes=2, episode_length=40, n_envs=2, horizon=5,
                      n_candidates=100, seed=0)
    assert np.isnan(result["pred_error_pre"]) and result["env_steps"] == 80
    collector = RolloutCollector(CHEETAH, {"task_split": "test"}, n_envs=2)
    random = collector.collect(collector.random_policy(), 0, 0, range(2), 40)
    collector.close()
    assert result["mean_return"] > 20 > max(float(r.reward.sum()) for r in random)
    # each episode's task as the env reported it (the draw depends on the seed, not the policy): a test-split joint
    assert result["tasks"] == [r.task_vector[0].tolist() for r in random]
    test_joints = {tuple(float(i == j) for i in range(6)) for j in (1, 4)}  # bshin, fshin: one-hot of the joint
    assert {tuple(t) for t in result["tasks"]} <= test_joints


def test_spearman_matches_scipy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 50, generator=g), torch.randn(3, 50, generator=g)
    b[0] = a[0] * 2 + 0.1 * b[0]
    for i in range(3):
        assert float(spearman(a, b)[i]) == pytest.approx(spearmanr(a[i], b[i]).statistic, abs=1e-12)


def test_candidate_ranking_of_the_true_model_is_perfect():
    envs, obs = vector(CHEETAH, 2)
    true = TrueDynamics(envs)
    acts = torch.rand(2, 30, 4, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    o = torch.as_tensor(obs, dtype=torch.float32)
    reward_fn = envs.envs[0].unwrapped.reward_fn
    same = candidate_ranking(true.dynamics(4), true.dynamics(4), reward_fn, o, acts)
    torch.testing.assert_close(same["spearman"], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(same["model_bias"], torch.zeros(2))
    torch.testing.assert_close(same["error_spread"], torch.zeros(2))
    # a model that predicts "nothing moves" ranks by control cost alone: far from the truth
    still = candidate_ranking(lambda x, a: x, true.dynamics(4), reward_fn, o, acts)
    assert (still["spearman"] < 0.9).all() and torch.isfinite(still["model_bias"]).all()
    # the spreads by hand: std (ddof 0) over candidates of the true returns and of model - true
    pred = candidate_returns(lambda x, a: x, reward_fn, o, acts)
    real = candidate_returns(true.dynamics(4), reward_fn, o, acts)
    torch.testing.assert_close(still["true_spread"], real.std(-1, correction=0))
    torch.testing.assert_close(still["error_spread"], (pred - real).std(-1, correction=0))
    torch.testing.assert_close(same["true_spread"], still["true_spread"])
    torch.testing.assert_close(same["slope"], torch.ones(2))
    # the slope by hand: least squares of the model's returns on the true ones
    slope = ((pred - pred.mean(-1, keepdim=True)) * (real - real.mean(-1, keepdim=True))).sum(-1) / (
        real - real.mean(-1, keepdim=True)).square().sum(-1)
    torch.testing.assert_close(still["slope"], slope)
    # planners use the same returns: random shooting on the true model picks the truly best candidate
    res = random_shooting(true.dynamics(4), reward_fn, o, horizon=4, n_candidates=30, action_low=-1.0,
                          action_high=1.0, act_dim=6, generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(res.expected_return).all()
    envs.close()


def test_open_loop_errors_by_hand():
    """One start, horizon 2, an untrained MB-MPC model: the figures equal a step-by-step computation."""
    collector = RolloutCollector(CHEETAH, {"task_split": "test"}, n_envs=1)
    rollouts = collector.collect(collector.random_policy(), 0, 0, range(1), 20)
    collector.close()
    torch.manual_seed(0)
    model = MBMPC().eval()
    r, t = rollouts[0]._replace(**{k: getattr(rollouts[0], k).float() for k in ("obs", "action", "next_obs")}), 16
    reward_fn = gym.make(CHEETAH).unwrapped.reward_fn
    out = open_loop_errors(model, rollouts, reward_fn, horizon=2, past_window=16, adapt=False, stride=100)
    assert out["n"] == 1
    with torch.no_grad():
        x1 = model.normalizer.next_obs(r.obs[t:t + 1], model.net(model.normalizer.inputs(r.obs[t:t + 1], r.action[t:t + 1])))
        x2 = model.normalizer.next_obs(x1, model.net(model.normalizer.inputs(x1, r.action[t + 1:t + 2])))
    assert out["err_1"] == pytest.approx(float((x1 - r.next_obs[t]).square().mean()), rel=1e-5)
    assert out["err_h"] == pytest.approx(float((x2 - r.next_obs[t + 1]).square().mean()), rel=1e-5)
    true_return = float(r.reward[t] + r.reward[t + 1])
    pred = float(reward_fn(r.obs[t:t + 1], r.action[t:t + 1], x1) + reward_fn(x1, r.action[t + 1:t + 2], x2))
    assert out["return_bias"] == pytest.approx(pred - true_return, rel=1e-4, abs=1e-4)


def test_errors_around_changes_on_the_drift_task():
    """x' = x + a + c with c switching 0 -> 3 mid-rollout: the offsets, counts and errors follow by hand."""
    import lightning as L

    from lit_meta.nets import MLP
    from lit_meta.rl import GrBAL
    from lit_meta.rl.buffer import Rollout
    from lit_meta.rl.diagnostics import errors_around_changes

    L.seed_everything(0)
    model = GrBAL(MLP(1, 2, (8,)), obs_dim=2, action_dim=1, exclude_obs_dims=[0, 1], inner_steps=1,
                  inner_lr=0.1).eval()
    n, change = 40, 20
    a = torch.rand(n, 1) * 2 - 1
    c = torch.where(torch.arange(n) < change, 0.0, 3.0)[:, None]
    x = torch.cat([torch.zeros(1), (a[:, 0] + c[:, 0]).cumsum(0)])
    obs = torch.stack([x[:-1], torch.arange(n, dtype=torch.float32)], -1)
    nxt = torch.stack([x[1:], torch.arange(1, n + 1, dtype=torch.float32)], -1)
    rollout = Rollout(obs, a, nxt, torch.zeros(n), torch.zeros(n, dtype=torch.bool), c, seed=0)
    out = errors_around_changes(model, [rollout], past_window=4, before=6, after=10, adapt=False)
    assert out["n_changes"] == 1 and out["count"].tolist() == [1.0] * 16
    with torch.no_grad():
        t = change + 3  # offset +3
        pred = model.net(model.normalizer.inputs(obs[t:t + 1], a[t:t + 1]))
        want = float((pred - model.normalizer.targets(obs[t:t + 1], nxt[t:t + 1])).square().mean())
    assert out["error"][6 + 3] == pytest.approx(want, rel=1e-5)
    adapted = errors_around_changes(model, [rollout], past_window=4, before=6, after=10, adapt=True)
    assert np.isfinite(adapted["error"]).all() and not np.allclose(adapted["error"], out["error"])
