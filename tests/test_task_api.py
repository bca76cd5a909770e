"""The task API a user expects (lit_meta.envs): set_task / get_task on wrapped and vector envs, task_changed,
composed perturbations, action clipping, and the messages of bad reset options / action shapes."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import lit_meta.envs as envs
from lit_meta.envs import get_task, set_task
from lit_meta.envs.half_cheetah import JOINTS, TOTAL_MASS

CHEETAH, ANT = "lit_meta/HalfCheetahCrippledJoint-v0", "lit_meta/AntCrippledLeg-v0"


def gear(env, joint: str) -> float:
    u = env.unwrapped
    return float(u.model.actuator_gear[u.model.actuator(joint).id, 0])


def flags(env, n: int, key: str = "task_changed") -> list:
    return [env.step(np.zeros(env.action_space.shape, np.float32))[4][key] for _ in range(n)]


# ----------------------------------------------------------------------------------- set_task / get_task
def test_set_task_through_gym_make_keeps_state_changes_model_and_flags_once():
    env = gym.make(CHEETAH)
    _, info = env.reset(seed=0, options={"task": {"crippled_joint": "bthigh"}})
    for _ in range(5):
        env.step(env.action_space.sample())
    u = env.unwrapped
    qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
    assert not hasattr(env, "set_task")  # the wrapper does not forward it: the function does
    set_task(env, {"crippled_joint": "fthigh"})
    np.testing.assert_array_equal(u.data.qpos, qpos)
    np.testing.assert_array_equal(u.data.qvel, qvel)
    assert gear(env, "fthigh") == 0.0 and gear(env, "bthigh") == 120.0  # the previous joint works again
    assert tuple(u.model.geom("fthigh").rgba[:3]) == pytest.approx((0.9, 0.1, 0.1))
    assert get_task(env) == u.get_task() == u.task == {"crippled_joint": "fthigh"}
    np.testing.assert_array_equal(u.task_vector(), np.eye(6)[JOINTS.index("fthigh")])
    *_, info = env.step(np.zeros(6, np.float32))
    assert info["task_changed"] is True and info["task"] == {"crippled_joint": "fthigh"}
    assert flags(env, 3) == [False, False, False]
    set_task(env, {"crippled_joint": "fthigh"})  # the same task: nothing changes
    assert flags(env, 1) == [False]
    u.task = {"crippled_joint": "none"}  # the property, then back before any step: no change seen
    u.set_task({"crippled_joint": "fthigh"})
    assert flags(env, 1) == [False]
    u.set_task("ffoot")
    assert flags(env, 2) == [True, False]


def test_set_task_takes_effect_on_the_next_step():
    """After a switch to crippled fthigh, pushing fthigh does nothing (same state, same next obs)."""
    env = gym.make(CHEETAH)
    env.reset(seed=0, options={"task": {"crippled_joint": "none"}})
    u = env.unwrapped
    qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
    push = np.zeros(6, np.float32)
    push[JOINTS.index("fthigh")] = 1.0
    intact = env.step(push)[0]
    u.set_state(qpos, qvel)
    set_task(env, {"crippled_joint": "fthigh"})
    crippled = env.step(push)[0]
    u.set_state(qpos, qvel)
    zero = env.step(np.zeros(6, np.float32))[0]
    assert np.abs(crippled - zero).max() < 1e-12 and np.abs(intact - zero).max() > 1e-3


def test_set_task_errors_change_nothing():
    env = gym.make(CHEETAH)
    with pytest.raises(RuntimeError, match=r"before reset\(\).*reset\(options="):
        set_task(env, {"crippled_joint": "bthigh"})
    assert get_task(env) is None
    env.reset(seed=0, options={"task": {"crippled_joint": "bthigh"}})
    with pytest.raises(ValueError, match="not a train task.*task_split='test'"):
        set_task(env, {"crippled_joint": "fshin"})
    with pytest.raises(ValueError, match="unknown joint 'knee'"):
        set_task(env, {"crippled_joint": "knee"})
    with pytest.raises(ValueError, match="a list of 2 tasks is for a vector env"):
        set_task(env, [{"crippled_joint": "bthigh"}, {"crippled_joint": "ffoot"}])
    assert get_task(env) == {"crippled_joint": "bthigh"} and gear(env, "bthigh") == 0.0
    assert flags(env, 1) == [False]
    with pytest.raises(TypeError, match="no lit_meta task API"):
        set_task(gym.make("Pendulum-v1"), {"crippled_joint": "bthigh"})
    with pytest.raises(TypeError, match="gymnasium env"):
        get_task("HalfCheetah")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_set_task_on_vector_env(mode):
    vec = gym.make_vec(CHEETAH, num_envs=3, vectorization_mode=mode)
    try:
        vec.reset(seed=0)
        vec.step(np.zeros((3, 6), np.float32))
        state = np.stack(vec.call("state_vector"))
        drawn = get_task(vec)
        tasks = [{"crippled_joint": j} for j in ("bthigh", "ffoot", "none")]
        set_task(vec, tasks)
        np.testing.assert_array_equal(np.stack(vec.call("state_vector")), state)  # physics kept
        assert get_task(vec) == tasks
        gears = np.stack([m.actuator_gear[:, 0] for m in vec.get_attr("model")])
        np.testing.assert_array_equal(gears == 0, [[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0] * 6])
        _, _, _, _, info = vec.step(np.zeros((3, 6), np.float32))
        assert info["task"]["crippled_joint"].tolist() == ["bthigh", "ffoot", "none"]
        np.testing.assert_array_equal(info["task_vector"].sum(1), [1, 1, 0])
        assert info["task_changed"].tolist() == [d != t for d, t in zip(drawn, tasks)]
        assert any(d != t for d, t in zip(drawn, tasks))
        assert vec.step(np.zeros((3, 6), np.float32))[4]["task_changed"].tolist() == [False] * 3

        set_task(vec, {"crippled_joint": "ffoot"})  # one task for every sub-env
        assert get_task(vec) == [{"crippled_joint": "ffoot"}] * 3
        assert vec.step(np.zeros((3, 6), np.float32))[4]["task_changed"].tolist() == [True, False, True]

        # a bad task for one sub-env: ValueError naming it, and no sub-env changes (async workers live on)
        with pytest.raises(ValueError, match=r"nothing changed, sub-env 1: .*crippled_joint='bshin' is not a train task"):
            set_task(vec, [{"crippled_joint": "bthigh"}, {"crippled_joint": "bshin"}, {"crippled_joint": "none"}])
        with pytest.raises(ValueError, match=r"sub-envs \[0, 1, 2\]: .*unknown joint"):
            set_task(vec, {"crippled_joint": "knee"})
        with pytest.raises(ValueError, match="got 2 tasks for a vector env of 3 sub-envs"):
            set_task(vec, [{"crippled_joint": "bthigh"}] * 2)
        assert get_task(vec) == [{"crippled_joint": "ffoot"}] * 3
        obs, *_ = vec.step(np.zeros((3, 6), np.float32))
        assert np.isfinite(obs).all()
    finally:
        vec.close()


def test_vector_env_before_reset_and_wrong_env():
    vec = gym.make_vec(CHEETAH, num_envs=2, vectorization_mode="sync")
    with pytest.raises(ValueError, match=r"before reset\(\)"):
        set_task(vec, {"crippled_joint": "bthigh"})
    assert get_task(vec) == [None, None]
    with pytest.raises(TypeError, match="no lit_meta task API"):
        set_task(gym.make_vec("Pendulum-v1", num_envs=2, vectorization_mode="sync"), {"x": 1})


def test_change_every_keeps_its_schedule_after_a_manual_switch():
    env = gym.make("lit_meta/HalfCheetahMass-v0", change_every=4)
    env.reset(seed=0)
    env.step(np.zeros(6, np.float32))
    set_task(env, {"mass_scale": 1.01})
    changed = flags(env, 8)
    assert [i for i, c in enumerate(changed) if c] == [0, 3, 7]  # manual switch, then steps 5 and 9


# ----------------------------------------------------------------------------------- composition
def test_composed_crippled_joint_and_mass():
    env = gym.make(CHEETAH, compose=("mass_scale",))
    u = env.unwrapped
    assert u.task_dim == 7 and u.compose == ("mass_scale",)
    _, info = env.reset(seed=0, options={"task": {"crippled_joint": "bthigh", "mass_scale": 1.3}})
    assert info["task"] == {"crippled_joint": "bthigh", "mass_scale": 1.3}
    np.testing.assert_array_equal(info["task_vector"], [1, 0, 0, 0, 0, 0, 1.3])
    assert gear(env, "bthigh") == 0.0 and gear(env, "ffoot") == 30.0
    ids = u._robot_body_ids
    assert u.model.body_mass[ids].sum() == pytest.approx(TOTAL_MASS * 1.3, rel=1e-12)
    # mid-episode: the joint and the mass change together, the state is kept
    qpos = u.data.qpos.copy()
    set_task(env, {"crippled_joint": "ffoot", "mass_scale": 0.6})
    np.testing.assert_array_equal(u.data.qpos, qpos)
    assert gear(env, "bthigh") == 120.0 and gear(env, "ffoot") == 0.0
    assert u.model.body_mass[ids].sum() == pytest.approx(TOTAL_MASS * 0.6, rel=1e-12)
    # a task that omits the composed key gets 1.0 (in the train range)
    set_task(env, {"crippled_joint": "none"})
    assert get_task(env) == {"crippled_joint": "none", "mass_scale": 1.0}
    assert u.model.body_mass[ids].sum() == pytest.approx(TOTAL_MASS, rel=1e-12)
    np.testing.assert_array_equal(u.task_vector({"crippled_joint": "fshin", "mass_scale": 2.0}),
                                  [0, 0, 0, 0, 1, 0, 2.0])


def test_two_joints_at_once():
    env = gym.make(CHEETAH, train_joints=("bthigh", "ffoot", ("ffoot", "bthigh")), compose=("friction_scale",))
    u = env.unwrapped
    _, info = env.reset(seed=0, options={"task": {"crippled_joint": ["ffoot", "bthigh"], "friction_scale": 0.7}})
    assert info["task"] == {"crippled_joint": ["bthigh", "ffoot"], "friction_scale": 0.7}  # actuator order
    np.testing.assert_array_equal(info["task_vector"], [1, 0, 0, 0, 0, 1, 0.7])
    assert gear(env, "bthigh") == gear(env, "ffoot") == 0.0 and gear(env, "fthigh") == 120.0
    np.testing.assert_allclose(u.model.geom_friction, u._orig_friction * 0.7)
    # with a combination in the splits every value is a list (one type per key): single joints, intact too
    set_task(env, {"crippled_joint": "bthigh", "friction_scale": 1.0})
    assert get_task(env)["crippled_joint"] == ["bthigh"]
    set_task(env, {"crippled_joint": None, "friction_scale": 1.0})
    assert get_task(env)["crippled_joint"] == [] and not u.task_vector()[:6].any()
    drawn = {tuple(env.reset(seed=s)[1]["task"]["crippled_joint"]) for s in range(30)}
    assert drawn == {("bthigh",), ("ffoot",), ("bthigh", "ffoot"), ()}


def test_ant_two_legs_and_mass():
    env = gym.make(ANT, train_legs=(0, 1, (0, 2)), compose=("mass_scale",))
    u = env.unwrapped
    _, info = env.reset(seed=0, options={"task": {"crippled_leg": [2, 0], "mass_scale": 1.2}})
    assert info["task"] == {"crippled_leg": [0, 2], "mass_scale": 1.2}
    np.testing.assert_array_equal(info["task_vector"], [1, 0, 1, 0, 1.2])
    off = np.flatnonzero(u.model.actuator_gear[:, 0] == 0).tolist()
    assert sorted(off) == sorted(u._leg_actuators[0] + u._leg_actuators[2])
    for leg in (0, 2):
        for g in u._leg_geoms[leg]:
            assert tuple(u.model.geom_rgba[g, :3]) == pytest.approx((0.9, 0.1, 0.1))
    assert u.model.body_mass[1:].sum() == pytest.approx(1.2 * u._orig_mass.sum(), rel=1e-12)
    # one type per key in vector infos: lists (object arrays) for every sub-env
    vec = gym.make_vec(ANT, num_envs=3, vectorization_mode="sync", train_legs=(0, 1, (0, 2)), compose=("mass_scale",))
    _, info = vec.reset(seed=0)
    assert info["task_vector"].shape == (3, 5)
    assert all(isinstance(v, list) for v in info["task"]["crippled_leg"])
    vec.close()


def test_scale_env_composes_the_other_scale():
    env = gym.make("lit_meta/HalfCheetahMass-v0", compose=("friction_scale",))
    u = env.unwrapped
    _, info = env.reset(seed=0, options={"task": {"mass_scale": 1.2, "friction_scale": 0.8}})
    np.testing.assert_array_equal(info["task_vector"], [1.2, 0.8])
    assert u.model.body_mass[u._robot_body_ids].sum() == pytest.approx(TOTAL_MASS * 1.2, rel=1e-12)
    np.testing.assert_allclose(u.model.geom_friction, u._orig_friction * 0.8)


@pytest.mark.parametrize("env_id", ["lit_meta/HalfCheetahSlopes-v0", "lit_meta/HalfCheetahPier-v0", ANT])
def test_compose_draws_within_its_ranges_and_keeps_the_main_draw(env_id):
    spec = {"mass_scale": None, "friction_scale": {"train_range": (0.8, 1.2), "test_ranges": (1.5, 2.0)}}
    for split in ("train", "test"):
        plain = gym.make(env_id, task_split=split)
        composed = gym.make(env_id, task_split=split, compose=spec)
        assert composed.unwrapped.task_dim == plain.unwrapped.task_dim + 2
        for seed in range(4):
            t0, t1 = plain.reset(seed=seed)[1]["task"], composed.reset(seed=seed)[1]["task"]
            assert {k: v for k, v in t1.items() if k not in envs.COMPOSABLE} == t0  # drawn first, as without
            lo, hi = (0.8, 1.2) if split == "train" else (1.5, 2.0)
            assert lo <= t1["friction_scale"] <= hi
            mass = t1["mass_scale"]
            assert 0.5 <= mass <= 1.5 if split == "train" else (0.25 <= mass <= 0.4 or 1.75 <= mass <= 2.5)


def test_composition_errors_say_what_and_how():
    with pytest.raises(ValueError, match=r"'friction_scale' is a composed perturbation.*compose=\('friction_scale',\)"):
        gym.make(CHEETAH).reset(options={"task": {"crippled_joint": "bthigh", "friction_scale": 0.9}})
    with pytest.raises(ValueError, match=r"compose key 'gravity' is not allowed: use keys of \('mass_scale', "
                                         r"'friction_scale'\)"):
        gym.make(CHEETAH, compose=("gravity",))
    with pytest.raises(ValueError, match=r"'mass_scale' is not allowed: it is this env's own task key.*"
                                         r"compose=\('friction_scale',\)"):
        gym.make("lit_meta/AntMass-v0", compose="mass_scale")
    with pytest.raises(ValueError, match="appears twice"):
        gym.make(CHEETAH, compose=("mass_scale", "mass_scale"))
    with pytest.raises(ValueError, match=r"compose\['mass_scale'\]=\{'train': \(1, 2\)\} is not allowed.*'train_range'"):
        gym.make(CHEETAH, compose={"mass_scale": {"train": (1, 2)}})
    with pytest.raises(ValueError, match="scales must be > 0"):
        gym.make(CHEETAH, compose={"mass_scale": {"train_range": (0.0, 2.0)}})
    test_env = gym.make(CHEETAH, task_split="test", compose=("mass_scale",))
    with pytest.raises(ValueError, match=r"mass_scale=1 \(the value of a task that omits it\) is a train task but "
                                         r"task_split='test'.*pick a value in \[0.25, 0.4\] or \[1.75, 2.5\]"):
        test_env.reset(options={"task": {"crippled_joint": "fshin"}})
    with pytest.raises(ValueError, match=r"mass_scale=3 is in neither split"):
        test_env.reset(options={"task": {"crippled_joint": "fshin", "mass_scale": 3.0}})
    test_env.reset(options={"task": {"crippled_joint": "fshin", "mass_scale": 2.0}})
    with pytest.raises(ValueError, match="must be a number"):
        test_env.unwrapped.set_task({"crippled_joint": "fshin", "mass_scale": "heavy"})
    assert get_task(test_env) == {"crippled_joint": "fshin", "mass_scale": 2.0}
    # combinations
    with pytest.raises(ValueError, match=r"overlap \(both hold \['bthigh', 'ffoot'\]\)"):
        gym.make(CHEETAH, train_joints=(("bthigh", "ffoot"),), test_joints=(("ffoot", "bthigh"),))
    with pytest.raises(ValueError, match=r"crippled_joint=\['bthigh', 'ffoot'\] is in neither split.*"
                                         r"train_joints=\(\.\.\., \('bthigh', 'ffoot'\)\)"):
        gym.make(CHEETAH).reset(options={"task": {"crippled_joint": ["bthigh", "ffoot"]}})
    with pytest.raises(ValueError, match="joint 'fshin' appears twice"):
        gym.make(CHEETAH).unwrapped.task_vector({"crippled_joint": ["fshin", "fshin"]})
    with pytest.raises(ValueError, match="'none' \\(None\\) cannot be in a list"):
        gym.make(CHEETAH, train_joints=("bthigh", ("none", "ffoot")))
    with pytest.raises(ValueError, match=r"crippled_leg=\[1, 2\] is in neither split.*train_legs=\(\.\.\., \(1, 2\)\)"):
        gym.make(ANT).reset(options={"task": {"crippled_leg": [1, 2]}})
    with pytest.raises(ValueError, match="is not a test task.*task_split='train'"):
        gym.make(ANT, train_legs=(0, (1, 2)), task_split="test").reset(options={"task": {"crippled_leg": (2, 1)}})


@pytest.mark.parametrize("env_id, kwargs", [
    (CHEETAH, dict(train_joints=("bthigh", ("bthigh", "fthigh")), compose=("mass_scale", "friction_scale"))),
    (ANT, dict(train_legs=(0, (1, 2)), compose=("friction_scale",))),
    ("lit_meta/HalfCheetahSlopes-v0", dict(compose=("mass_scale",))),
])
def test_reward_fn_equals_env_reward_composed_and_out_of_range(env_id, kwargs):
    env = gym.make(env_id, change_every=15, **kwargs)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=1)
    rows, changed = [], 0
    for t in range(45):
        act = rng.uniform(-2.5, 2.5, env.action_space.shape).astype(np.float32)  # ~60% of values out of range
        nxt, rew, term, trunc, info = env.step(act)
        rows.append((obs, act, nxt, rew))
        changed += info["task_changed"]
        obs = nxt
        if term or trunc:
            obs, _ = env.reset()
    o, a, n, r = (torch.as_tensor(np.array(x), dtype=torch.float64) for x in zip(*rows))
    assert changed >= 1
    torch.testing.assert_close(env.unwrapped.reward_fn(o, a, n), r, rtol=0, atol=1e-5)
    torch.testing.assert_close(envs.reward_fn(env_id)(o, a, n), r, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------- action clipping
@pytest.mark.parametrize("env_id", [CHEETAH, ANT])
def test_out_of_range_action_is_clipped_for_physics_and_cost(env_id):
    env = gym.make(env_id)
    env.reset(seed=0)
    u = env.unwrapped
    qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
    shape = env.action_space.shape
    results = {}
    for name, scale in (("one", 1.0), ("five", 5.0), ("huge", 1e30)):
        u.set_state(qpos, qvel)
        obs = u._get_obs()
        act = np.full(shape, scale, np.float32)
        act[0] = -scale
        nxt, rew, term, trunc, info = env.step(act)
        results[name] = (nxt, rew, info)
        fn_reward = u.reward_fn(torch.as_tensor(obs), torch.as_tensor(act), torch.as_tensor(nxt))
        assert float(fn_reward) == pytest.approx(rew, abs=1e-6)
        assert info["action_clipped"] is (scale > 1) and info["unstable"] is False and not trunc
    for name in ("five", "huge"):  # the same physics (up to ~1e-15: set_state keeps the solver's warm start)
        np.testing.assert_allclose(results[name][0], results["one"][0], rtol=0, atol=1e-9)
        assert results[name][1] == pytest.approx(results["one"][1], abs=1e-9)
    # HalfCheetah's documented case: a = 5 costs what a = 1 costs (0.1 * 6 = 0.6 control cost), not 15.0
    if env_id == CHEETAH:
        u.set_state(qpos, qvel)
        x = u.data.qpos[0]
        _, rew, *_ = env.step(np.full(shape, 5.0, np.float32))
        assert rew == pytest.approx((u.data.qpos[0] - x) / u.dt - 0.1 * 6, abs=1e-6)  # v5: float32 cost


def test_action_clipped_flag_per_step_and_in_vector_infos():
    env = gym.make(CHEETAH)
    env.reset(seed=0)
    inside = np.array([1, -1, 0.5, 0, 0, 0], np.float32)  # the bounds themselves are not clipped
    assert env.step(inside)[4]["action_clipped"] is False
    assert env.step(np.array([0, 0, 0, 0, 0, 1.0001], np.float32))[4]["action_clipped"] is True
    assert env.step(np.array([0, 0, 0, 0, 0, 1.0], np.float64))[4]["action_clipped"] is False
    vec = gym.make_vec(CHEETAH, num_envs=2, vectorization_mode="sync")
    vec.reset(seed=0)
    info = vec.step(np.array([[0] * 6, [2] * 6], np.float32))[4]
    assert info["action_clipped"].tolist() == [False, True]
    vec.close()


def test_reward_fn_clip_bounds():
    obs = torch.zeros(2, 18, dtype=torch.float64)
    act = torch.tensor([[3.0, -3.0, 0.5, 0, 0, 0], [1.0, -1.0, 0.5, 0, 0, 0]], dtype=torch.float64)
    r = envs.reward_fn(CHEETAH)(obs, act, obs)
    assert r[0] == r[1] == pytest.approx(-0.1 * 2.25)
    unclipped = envs.reward_fn(CHEETAH, action_low=None, action_high=None)(obs, act, obs)
    assert unclipped[0] == pytest.approx(-0.1 * 18.25)
    per_dim = envs.reward_fn(CHEETAH, action_low=[-2.0] * 6, action_high=[2.0] * 6)(obs.float(), act.float(), obs.float())
    assert per_dim.dtype == torch.float32 and per_dim[0] == pytest.approx(-0.1 * 8.25)
    act.requires_grad_()
    envs.reward_fn(CHEETAH)(obs, act, obs).sum().backward()
    assert act.grad[0, :2].tolist() == [0.0, 0.0] and act.grad[0, 2] == pytest.approx(-0.1)


# ----------------------------------------------------------------------------------- messages
def test_reset_options_must_be_a_dict_with_known_keys():
    env = gym.make(CHEETAH)
    env.reset(seed=0, options={"task": {"crippled_joint": "bthigh"}})
    with pytest.raises(ValueError, match=r"options='fshin' is not allowed: options must be a dict like \{'task'"):
        env.reset(options="fshin")
    with pytest.raises(ValueError, match=r"unknown key 'tsk' in options=\{'tsk': 'fshin'\}: the allowed keys are "
                                         r"\('task',\)"):
        env.reset(options={"tsk": "fshin"})
    assert get_task(env) == {"crippled_joint": "bthigh"}  # raised before any change
    env.reset(options={})  # an empty dict (and None) draw a task of the split
    env.reset(options=None)


def test_action_shape_messages():
    env = gym.make(CHEETAH)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"got an action of shape \(3, 6\), expected \(6,\)"):
        env.step(np.zeros((3, 6), np.float32))
    vec = gym.make_vec(CHEETAH, num_envs=3, vectorization_mode="sync")
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"got an action of shape \(\), expected \(6,\) \(one value per actuator\)\. "
                                         r"A gymnasium vector env .* needs actions of shape \[num_envs, "
                                         r"\*action_shape\] = \(num_envs, 6\)"):
        vec.step(np.zeros(6, np.float32))  # a single env's action
    vec.close()
