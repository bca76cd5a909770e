"""The perturbed MuJoCo envs (lit_meta.envs): gymnasium API, rewards from transitions, tasks, bad input, rendering."""

from __future__ import annotations

import ctypes.util
import logging
import math
import os
import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import lit_meta.envs as envs
from lit_meta.envs import ENV_IDS

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; read when the first renderer is made

CHEETAH, ANT = "lit_meta/HalfCheetahCrippledJoint-v0", "lit_meta/AntCrippledLeg-v0"
# one task of each split per env (for options={"task": ...}) and a bad one with the words its error names
TASKS = {
    "lit_meta/HalfCheetahCrippledJoint-v0": ({"crippled_joint": "bthigh"}, {"crippled_joint": "bshin"},
                                             {"crippled_joint": "knee"}, "unknown joint"),
    "lit_meta/HalfCheetahSlopes-v0": ({"terrain": "random", "slopes": [0.1] * 20}, {"terrain": "hill"},
                                      {"terrain": "mountain"}, "unknown terrain"),
    "lit_meta/HalfCheetahPier-v0": ({"damping": [5.0] * 30}, {"damping": [15.0] * 30}, {"damping": [1.0] * 3},
                                    "30 finite numbers"),
    "lit_meta/HalfCheetahMass-v0": ({"mass_scale": 1.2}, {"mass_scale": 2.0}, {"mass_scale": -1.0}, "> 0"),
    "lit_meta/HalfCheetahFriction-v0": ({"friction_scale": 0.8}, {"friction_scale": 0.3}, {"friction": 1.0},
                                        "one key 'friction_scale'"),
    "lit_meta/AntCrippledLeg-v0": ({"crippled_leg": 1}, {"crippled_leg": 3}, {"crippled_leg": 7}, "unknown leg"),
    "lit_meta/AntMass-v0": ({"mass_scale": 0.7}, {"mass_scale": 0.3}, {"mass_scale": float("nan")}, "finite"),
    "lit_meta/AntFriction-v0": ({"friction_scale": 1.4}, {"friction_scale": 2.2}, {"friction_scale": "x"},
                                "must be a number"),
}


def make(env_id=CHEETAH, **kwargs):
    return gym.make(env_id, **kwargs)


def rollout(env, steps, seed, reset_every=None):
    """Random actions (seeded); returns float64 arrays obs, act, next_obs, reward, terminated and the infos."""
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    out = {k: [] for k in ("obs", "act", "next_obs", "reward", "terminated", "info")}
    for t in range(steps):
        act = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
        nxt, rew, term, trunc, info = env.step(act)
        for k, v in zip(out, (obs, act, nxt, rew, term, info)):
            out[k].append(v)
        obs = nxt
        if term or trunc or (reset_every and (t + 1) % reset_every == 0):
            obs, _ = env.reset()
    arrays = {k: torch.as_tensor(np.array(v), dtype=torch.float64) for k, v in out.items() if k not in ("terminated", "info")}
    return arrays, np.array(out["terminated"]), out["info"]


# ----------------------------------------------------------------------------------- gymnasium API
def test_registered_with_time_limit():
    for env_id in ENV_IDS:
        assert gym.spec(env_id).max_episode_steps == 1000
    env = make(max_episode_steps=3)
    env.reset(seed=0)
    truncated = [env.step(env.action_space.sample())[3] for _ in range(3)]
    assert truncated == [False, False, True]


@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is")  # MuJoCo: unbounded obs
@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_check_env(env_id, split):
    env = make(env_id, task_split=split)
    check_env(env.unwrapped, skip_render_check=True)
    space = env.observation_space
    assert space.dtype == np.float64 and env.action_space.dtype == np.float32
    assert space.shape == ((18,) if "Cheetah" in env_id else (107,))


def test_observation_includes_position():
    env = make(CHEETAH)
    obs, info = env.reset(seed=0)
    assert obs[0] == info["x_position"]
    env = make(ANT)
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs[:3], env.unwrapped.data.qpos[:3])


def test_unperturbed_cheetah_is_bitwise_half_cheetah_v5():
    """The string-compiled model (settotalmass applied after compiling) has v5's exact dynamics."""
    ref = gym.make("HalfCheetah-v5", exclude_current_positions_from_observation=False).unwrapped
    env = make(CHEETAH).unwrapped
    ref.reset(seed=1)
    env.reset(seed=1, options={"task": {"crippled_joint": None}})
    env.set_state(ref.data.qpos.copy(), ref.data.qvel.copy())
    rng = np.random.default_rng(0)
    for _ in range(50):
        act = rng.uniform(-1, 1, 6).astype(np.float32)
        o1, r1, *_ = ref.step(act)
        o2, r2, *_ = env.step(act)
        np.testing.assert_array_equal(o1, o2)
        assert r1 == r2


# ----------------------------------------------------------------------------------- rewards
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_reward_fn_equals_env_reward(env_id):
    env = make(env_id, change_every=40)
    data, terminated, infos = rollout(env, 120, seed=3, reset_every=70)
    assert any(i["task_changed"] for i in infos)
    fn, term_fn = env.unwrapped.reward_fn, env.unwrapped.termination_fn
    reward = fn(data["obs"], data["act"], data["next_obs"])
    assert reward.shape == (120,) and reward.dtype == torch.float64
    torch.testing.assert_close(reward, data["reward"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(term_fn(data["obs"], data["act"], data["next_obs"]).numpy(), terminated)
    # the same callables without an env, from the id
    torch.testing.assert_close(envs.reward_fn(env_id)(data["obs"], data["act"], data["next_obs"]), reward)
    # any leading dims, float32 stays float32, differentiable
    obs, act, nxt = (data[k][:12].reshape(3, 4, -1).float().requires_grad_() for k in ("obs", "act", "next_obs"))
    r32 = fn(obs, act, nxt)
    assert r32.shape == (3, 4) and r32.dtype == torch.float32
    r32.sum().backward()
    assert act.grad is not None and torch.isfinite(act.grad).all() and nxt.grad[..., 0].abs().sum() > 0
    assert term_fn(obs, act, nxt).shape == (3, 4)


def test_ant_termination_and_healthy_reward():
    obs, _ = make(ANT).reset(seed=0)
    obs = torch.as_tensor(np.stack([obs, obs]))
    fallen = obs.clone()
    fallen[1, 2] = 0.1  # torso below healthy_z_range
    act = torch.zeros(2, 8, dtype=torch.float64)
    assert envs.termination_fn(ANT)(obs, act, fallen).tolist() == [False, True]
    r = envs.reward_fn(ANT)(obs, act, fallen)
    assert math.isclose(r[0] - r[1], 1.0, abs_tol=1e-12)  # the healthy reward
    assert not envs.termination_fn(ANT, terminate_when_unhealthy=False)(obs, act, fallen).any()


def test_reward_fn_unknown_id():
    with pytest.raises(ValueError, match="unknown env id 'lit_meta/Nope-v0'.*HalfCheetahSlopes"):
        envs.reward_fn("lit_meta/Nope-v0")


# ----------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_task_option_applied_and_in_info(env_id):
    train_task, test_task, _, _ = TASKS[env_id]
    for split, task in (("train", train_task), ("test", test_task)):
        env = make(env_id, task_split=split)
        obs, info = env.reset(seed=0, options={"task": task})
        u = env.unwrapped
        assert u.get_task() == info["task"]
        for key, value in task.items():
            assert info["task"][key] == value
        vec = u.task_vector()
        assert vec.dtype == np.float64 and vec.shape == (u.task_dim,)
        np.testing.assert_array_equal(info["task_vector"], vec)
        np.testing.assert_array_equal(u.task_vector(task), vec)
        *_, info = env.step(env.action_space.sample())
        assert info["task"] == u.get_task() and info["unstable"] is False and info["task_changed"] is False


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_bad_tasks_raise(env_id):
    train_task, test_task, bad, words = TASKS[env_id]
    env = make(env_id)
    with pytest.raises(ValueError, match=words):
        env.reset(options={"task": bad})
    with pytest.raises(ValueError, match="task_split='test'"):  # a test task in the train split, and the fix
        env.reset(options={"task": test_task})
    with pytest.raises(ValueError, match="task_split='train'"):
        make(env_id, task_split="test").reset(options={"task": train_task})


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="task_split='val' is not allowed.*'train'.*'test'"):
        make(task_split="val")
    with pytest.raises(ValueError, match="change_every=0 is not allowed"):
        make(change_every=0)
    with pytest.raises(ValueError, match="overlap"):
        make("lit_meta/AntMass-v0", train_range=(0.5, 1.5), test_ranges=((1.0, 2.0),))
    with pytest.raises(ValueError, match="overlap"):
        make(CHEETAH, test_joints=("bthigh",))
    with pytest.raises(ValueError, match="exclude_current_positions_from_observation=True is not allowed"):
        make(ANT, exclude_current_positions_from_observation=True)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_splits_disjoint_and_seeded(env_id):
    vectors = {}
    for split in ("train", "test"):
        env = make(env_id, task_split=split)
        vectors[split] = {tuple(env.reset(seed=s)[1]["task_vector"]) for s in range(12)}
        again = make(env_id, task_split=split)
        assert tuple(again.reset(seed=11)[1]["task_vector"]) in vectors[split]
    assert not vectors["train"] & vectors["test"]
    assert len(vectors["train"]) > 1 and len(vectors["test"]) >= 1  # AntCrippledLeg tests on leg 3 only
    if "Mass" in env_id or "Friction" in env_id:
        assert all(0.5 <= v[0] <= 1.5 for v in vectors["train"])
        assert all(0.25 <= v[0] <= 0.4 or 1.75 <= v[0] <= 2.5 for v in vectors["test"])


def test_seeded_rollouts_are_deterministic():
    a, _, ia = rollout(make("lit_meta/HalfCheetahPier-v0", change_every=7), 30, seed=5)
    b, _, ib = rollout(make("lit_meta/HalfCheetahPier-v0", change_every=7), 30, seed=5)
    c, _, _ = rollout(make("lit_meta/HalfCheetahPier-v0", change_every=7), 30, seed=6)
    torch.testing.assert_close(a["next_obs"], b["next_obs"], rtol=0, atol=0)
    assert [i["task"] for i in ia] == [i["task"] for i in ib]
    assert not torch.equal(a["next_obs"], c["next_obs"])


def test_change_every_switches_tasks_mid_episode():
    env = make("lit_meta/HalfCheetahMass-v0", change_every=5)
    _, info = env.reset(seed=0)
    tasks, changed = [info["task"]], []
    for _ in range(16):
        *_, info = env.step(env.action_space.sample())
        tasks.append(info["task"])
        changed.append(info["task_changed"])
    assert [i for i, c in enumerate(changed) if c] == [5, 10, 15]  # the 6th, 11th, 16th step
    assert tasks[5] == tasks[1] != tasks[6] == tasks[10] != tasks[11]
    u = env.unwrapped
    assert math.isclose(u.model.body_mass[1:].sum(), 14.0 * tasks[-1]["mass_scale"], rel_tol=1e-9)


def _effect_of(env, actuators, task):
    """Max |next_obs(action on `actuators`) - next_obs(zero action)| from the same state (up to ~1e-15 from
    the solver's warm start, which set_state keeps)."""
    env.reset(seed=0, options={"task": task})
    u = env.unwrapped
    qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
    zero = np.zeros(env.action_space.shape, np.float32)
    push = zero.copy()
    push[actuators] = 1.0
    out = []
    for action in (zero, push):
        u.set_state(qpos, qvel)
        out.append(env.step(action)[0])
    return np.abs(out[1] - out[0]).max()


def test_crippled_joint_has_no_effect():
    for split, joint in (("train", "bthigh"), ("test", "fshin")):
        env = make(CHEETAH, task_split=split)
        i = envs.half_cheetah.JOINTS.index(joint)
        assert _effect_of(env, [i], {"crippled_joint": joint}) < 1e-12
        assert tuple(env.unwrapped.model.geom(joint).rgba[:3]) == pytest.approx((0.9, 0.1, 0.1))
        assert _effect_of(env, [(i + 1) % 6], {"crippled_joint": joint}) > 1e-3  # the others still work
        if split == "train":
            assert _effect_of(env, [i], {"crippled_joint": None}) > 1e-3
            assert tuple(env.unwrapped.model.geom(joint).rgba[:3]) == pytest.approx((0.8, 0.6, 0.4))


def test_crippled_leg_has_no_effect_and_is_shrunk():
    env = make(ANT, task_split="test")
    u = env.unwrapped
    leg3 = u._leg_actuators[3]
    assert sorted(leg3) == [0, 1]  # hip_4, ankle_4: the first two actuators of ant.xml
    assert _effect_of(env, leg3, {"crippled_leg": 3}) < 1e-12
    assert _effect_of(env, [2, 3], {"crippled_leg": 3}) > 1e-3
    ankle = u.model.geom("fourth_ankle_geom")
    assert ankle.size[1] == pytest.approx(0.5 * math.hypot(0.4, 0.4) / 2)  # shrink=0.5
    assert tuple(ankle.rgba[:3]) == pytest.approx((0.9, 0.1, 0.1))
    train = make(ANT)
    train.reset(seed=0, options={"task": {"crippled_leg": None}})
    assert train.unwrapped.model.geom("fourth_ankle_geom").size[1] == pytest.approx(math.hypot(0.4, 0.4) / 2)


def test_pier_blocks_float_and_differ():
    env = make("lit_meta/HalfCheetahPier-v0")
    _, info = env.reset(seed=0)
    u = env.unwrapped
    np.testing.assert_array_equal(u.model.dof_damping[u._block_dofs], info["task"]["damping"])
    assert len(set(info["task"]["damping"])) == u.n_blocks
    for _ in range(20):
        env.step(np.zeros(6, np.float32))
    sunk = u.data.qpos[u._block_qpos]
    assert sunk.min() < -0.01 and np.abs(sunk[-5:]).max() == 0.0  # blocks under the cheetah sink, far ones rest


def test_slopes_height_field_follows_the_task():
    env = make("lit_meta/HalfCheetahSlopes-v0", task_split="test")
    u = env.unwrapped
    model_before = u.model
    profiles = {}
    for name in ("hill", "basin"):
        env.reset(seed=0, options={"task": name})
        profiles[name] = u.model.hfield_data.copy()
        x = envs.terrain.breakpoints(u.get_task()["slopes"], u.SLOPE_START, u.segment_length)[0]
        assert u.terrain_height(x[5]) == pytest.approx(5.0 if name == "hill" else -5.0)
    assert u.model is model_before and not np.array_equal(profiles["hill"], profiles["basin"])
    peak = round((x[5] - u.X_MIN) / u.resolution)  # the column at the hill top / basin bottom (row 0)
    assert profiles["hill"][peak] == pytest.approx(0.75) and profiles["basin"][peak] == pytest.approx(0.25)


def test_pickle_roundtrip_keeps_arguments():
    env = make("lit_meta/HalfCheetahPier-v0", n_blocks=5, task_split="test", change_every=3).unwrapped
    clone = pickle.loads(pickle.dumps(env))
    assert (clone.n_blocks, clone.task_split, clone.change_every) == (5, "test", 3)


@pytest.mark.parametrize("mode, env_id", [("sync", ANT), ("async", "lit_meta/HalfCheetahPier-v0")])
def test_vector_env(mode, env_id):
    """Infos stack across envs: task values keep one type per key (intact leg = -1, not None)."""
    vec = gym.make_vec(env_id, num_envs=3, vectorization_mode=mode)
    obs, info = vec.reset(seed=0)
    assert obs.shape[0] == 3 and info["task_vector"].shape == (3, vec.unwrapped.get_attr("task_dim")[0])
    for _ in range(3):
        obs, rew, term, trunc, info = vec.step(vec.action_space.sample())
    assert np.isfinite(obs).all() and not info["unstable"].any() and len(info["task"][next(iter(info["task"]))]) == 3
    if env_id == ANT:
        assert info["task"]["crippled_leg"].dtype.kind == "i" and -1 in info["task"]["crippled_leg"]
    vec.close()


# ----------------------------------------------------------------------------------- bad physics
@pytest.mark.parametrize("env_id", [CHEETAH, ANT])
def test_non_finite_action_ends_episode(env_id, caplog):
    env = make(env_id)
    env.reset(seed=0)
    last, *_ = env.step(env.action_space.sample())
    action = np.zeros(env.action_space.shape, np.float32)
    action[1] = np.nan
    with caplog.at_level(logging.WARNING, logger="lit_meta.envs"):
        obs, rew, term, trunc, info = env.step(action)
        again = env.step(np.zeros_like(action))  # without reset: still flagged, not logged again
    np.testing.assert_array_equal(obs, last)
    assert (rew, term, trunc, info["unstable"]) == (0.0, False, True, True)
    assert "non-finite action" in info["unstable_reason"] and again[4]["unstable"] and again[3]
    records = [r for r in caplog.records if r.name == "lit_meta.envs"]
    assert len(records) == 1 and "non-finite action" in records[0].getMessage() and "reset()" in records[0].getMessage()
    obs, _ = env.reset()
    assert np.isfinite(obs).all() and env.step(np.zeros_like(action))[4]["unstable"] is False


@pytest.mark.parametrize("env_id", [CHEETAH, ANT, "lit_meta/HalfCheetahPier-v0"])
@pytest.mark.parametrize("blow_up", ["huge_velocity", "nan_position"])  # a huge action is clipped: test_task_api.py
def test_diverging_physics_is_caught(env_id, blow_up, caplog):
    env = make(env_id)
    env.reset(seed=0)
    last, *_ = env.step(env.action_space.sample())
    u = env.unwrapped
    action = np.zeros(env.action_space.shape, np.float32)
    if blow_up == "huge_velocity":
        u.data.qvel[:] = 1e12
    else:
        u.data.qpos[1] = np.nan
    with caplog.at_level(logging.WARNING, logger="lit_meta.envs"):
        obs, rew, term, trunc, info = env.step(action)
    np.testing.assert_array_equal(obs, last)
    assert np.isfinite(obs).all() and (rew, trunc, info["unstable"]) == (0.0, True, True)
    assert "MuJoCo warning" in info["unstable_reason"]
    assert sum(r.name == "lit_meta.envs" for r in caplog.records) == 1


# ----------------------------------------------------------------------------------- rendering
def _render_skip_reason() -> str | None:
    backend = os.environ.get("MUJOCO_GL", "egl")
    lib = {"egl": "EGL", "osmesa": "OSMesa"}.get(backend)
    if lib and ctypes.util.find_library(lib) is None:
        return (f"MUJOCO_GL={backend} but lib{lib} is missing: run scripts/install_render.sh "
                f"(Debian: {'libegl1 libgl1-mesa-dri' if lib == 'EGL' else 'libosmesa6'})")
    return None


@pytest.fixture(scope="module")
def can_render():
    reason = _render_skip_reason()
    if reason:
        pytest.skip(reason)
    env = make(CHEETAH, render_mode="rgb_array", width=16, height=16)
    env.reset(seed=0)
    try:
        env.render()
    except Exception as exc:  # e.g. no EGL device / driver
        pytest.skip(f"offscreen rendering with MUJOCO_GL={os.environ.get('MUJOCO_GL')} failed: {exc!r}")
    finally:
        env.close()


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_render_rgb_array(env_id, can_render):
    env = make(env_id, render_mode="rgb_array", width=64, height=64)
    env.reset(seed=0)
    env.step(env.action_space.sample())
    frame = env.render()
    env.close()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8 and frame.std() > 5


def test_render_shows_the_new_height_field(can_render):
    env = make("lit_meta/HalfCheetahSlopes-v0", task_split="test", render_mode="rgb_array", width=64, height=64)
    u = env.unwrapped
    frames = {}
    for name in ("hill", "basin", "hill"):  # the render context exists after the first: uploads must follow
        env.reset(seed=0, options={"task": name})
        qpos = u.data.qpos.copy()
        qpos[0] = 7.0
        qpos[1] = float(u.terrain_height(7.0))
        u.set_state(qpos, u.data.qvel.copy())
        frames.setdefault(name, []).append(env.render())
    env.close()
    assert np.abs(frames["hill"][0].astype(int) - frames["basin"][0]).mean() > 1.0
    np.testing.assert_array_equal(frames["hill"][0], frames["hill"][1])
