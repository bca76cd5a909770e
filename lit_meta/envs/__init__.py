"""Perturbed MuJoCo envs for model-based meta-RL (GrBAL/ReBAL, Nagabandi et al. 2019, arXiv 1803.11347).

Importing this package registers with gymnasium (namespace ``lit_meta``, ``max_episode_steps=1000``)::

    import gymnasium as gym
    import lit_meta.envs
    env = gym.make("lit_meta/HalfCheetahCrippledJoint-v0", task_split="train", change_every=None)
    obs, info = env.reset(seed=0)                     # samples a task of the split
    obs, info = env.reset(options={"task": {"crippled_joint": "bthigh"}})
    info["task"], env.unwrapped.task_vector(), env.unwrapped.reward_fn(obs_t, act_t, next_obs_t)
    lit_meta.envs.set_task(env, {"crippled_joint": "fthigh"})  # now, mid-episode: the state is kept
    env.step(action)[4]["task_changed"]               # True once, on the next step
    lit_meta.envs.get_task(env)                       # {"crippled_joint": "fthigh"}

    vec = gym.make_vec("lit_meta/AntCrippledLeg-v0", num_envs=3)   # sync or async
    vec.reset(seed=0)
    lit_meta.envs.set_task(vec, {"crippled_leg": 1})                 # every sub-env
    lit_meta.envs.set_task(vec, [{"crippled_leg": i} for i in (0, 1, -1)])  # one per sub-env

Composed perturbations: ``compose=("mass_scale", "friction_scale")`` (either or both) makes every task
carry those scales on top of the env's own perturbation (and appends them to the task vector);
``HalfCheetahCrippledJoint`` / ``AntCrippledLeg`` accept several joints / legs at once where the split
lists such a combination, e.g. ``train_joints=("bthigh", ("bthigh", "ffoot"))``. Actions outside the
action space (``[-1, 1]``) are clipped before the physics and the control cost
(``info["action_clipped"]``), and ``reward_fn`` clips alike.

Ids: HalfCheetahCrippledJoint, HalfCheetahSlopes, HalfCheetahPier, HalfCheetahMass,
HalfCheetahFriction, AntCrippledLeg, AntMass, AntFriction (all ``-v0``). Rendering
(``render_mode="rgb_array"``) needs an OpenGL backend: set ``MUJOCO_GL=egl`` (or ``osmesa``) before
the first render; ``scripts/install_render.sh`` installs the Debian libraries.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import gymnasium as gym

from . import rewards
from .ant import AntCrippledLegEnv, AntFrictionEnv, AntMassEnv, AntTaskEnv
from .base import COMPOSABLE, get_task, set_task
from .half_cheetah import (HalfCheetahCrippledJointEnv, HalfCheetahFrictionEnv, HalfCheetahMassEnv,
                           HalfCheetahPierEnv, HalfCheetahSlopesEnv, HalfCheetahTaskEnv)

NAMESPACE = "lit_meta"
MAX_EPISODE_STEPS = 1000

# name -> (env class, robot)
_ENVS: dict[str, tuple[type, str]] = {
    "HalfCheetahCrippledJoint": (HalfCheetahCrippledJointEnv, "half_cheetah"),
    "HalfCheetahSlopes": (HalfCheetahSlopesEnv, "half_cheetah"),
    "HalfCheetahPier": (HalfCheetahPierEnv, "half_cheetah"),
    "HalfCheetahMass": (HalfCheetahMassEnv, "half_cheetah"),
    "HalfCheetahFriction": (HalfCheetahFrictionEnv, "half_cheetah"),
    "AntCrippledLeg": (AntCrippledLegEnv, "ant"),
    "AntMass": (AntMassEnv, "ant"),
    "AntFriction": (AntFrictionEnv, "ant"),
}
ENV_IDS: tuple[str, ...] = tuple(f"{NAMESPACE}/{name}-v0" for name in _ENVS)

for _name, (_cls, _) in _ENVS.items():
    _id = f"{NAMESPACE}/{_name}-v0"
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=f"{_cls.__module__}:{_cls.__name__}", max_episode_steps=MAX_EPISODE_STEPS)


def _robot(env_id: str) -> str:
    name = env_id.split("/", 1)[-1].rsplit("-v", 1)[0] if isinstance(env_id, str) else None
    if name not in _ENVS or env_id not in (f"{NAMESPACE}/{name}-v0", name):
        raise ValueError(f"unknown env id {env_id!r}: use one of {ENV_IDS}")
    return _ENVS[name][1]


def reward_fn(env_id: str, **weights) -> Callable:
    """The batched torch ``reward_fn(obs, action, next_obs)`` of ``env_id`` with its default weights
    (``dt=0.05``, v5 reward weights); override any with keyword arguments, e.g. ``ctrl_cost_weight=0.2``.
    An env instance has the same function, bound to its actual settings, as ``env.unwrapped.reward_fn``.
    Actions are clipped to ``[action_low, action_high]`` (default ``[-1, 1]``) as in the envs."""
    fn = rewards.half_cheetah_reward if _robot(env_id) == "half_cheetah" else rewards.ant_reward
    return functools.partial(fn, **weights)


def termination_fn(env_id: str, **settings) -> Callable:
    """The batched torch ``termination_fn(obs, action, next_obs) -> BoolTensor`` of ``env_id``
    (Ant: ``healthy_z_range``, ``terminate_when_unhealthy`` can be overridden)."""
    fn = rewards.half_cheetah_termination if _robot(env_id) == "half_cheetah" else rewards.ant_termination
    return functools.partial(fn, **settings)


__all__ = ["ENV_IDS", "NAMESPACE", "COMPOSABLE", "reward_fn", "termination_fn", "set_task", "get_task", "rewards",
           "AntTaskEnv", "AntCrippledLegEnv", "AntMassEnv", "AntFrictionEnv", "HalfCheetahTaskEnv",
           "HalfCheetahCrippledJointEnv", "HalfCheetahSlopesEnv", "HalfCheetahPierEnv", "HalfCheetahMassEnv",
           "HalfCheetahFrictionEnv"]
