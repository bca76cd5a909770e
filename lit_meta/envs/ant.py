"""Perturbed Ant envs (GrBAL/ReBAL, Nagabandi et al. 2019) on gymnasium's ``Ant-v5``.

The official ``ant.xml`` and the v5 reward (forward + healthy - control - contact cost), with the
observation ``qpos (15, x y z first) + qvel (14) + clipped cfrc_ext[1:] (78)`` = 107 float64, so that
:func:`lit_meta.envs.rewards.ant_reward` computes the reward from transitions. One addition to v5:
after each step the body positions are brought up to date with the final ``qpos``
(``mj_kinematics``; the state and dynamics are untouched), so the main body (torso) position the v5
reward reads is ``obs[0:2]`` exactly (plain v5 reads it one MuJoCo substep late).

Tasks: ``AntCrippledLeg``, ``AntMass``, ``AntFriction``. Common kwargs: ``task_split``,
``change_every``, ``compose`` (default None: extra ``mass_scale`` / ``friction_scale`` keys every task
carries, applied on top of the env's own perturbation, one task-vector entry each; see
:func:`lit_meta.envs.base.check_compose`), the v5 reward weights and settings, ``frame_skip``,
``reset_noise_scale`` and the MuJoCo render kwargs.

Actions (8, float32, ``[-1, 1]`` per actuator): an action outside ``[-1, 1]`` is clipped before the
physics and the control cost, and the step's ``info["action_clipped"]`` is True (False otherwise);
``reward_fn`` clips the same way. Mid-episode task switches from user code: ``env.unwrapped.set_task``,
or :func:`lit_meta.envs.set_task` through wrappers / on vector envs (see :mod:`lit_meta.envs.base`).
"""

from __future__ import annotations

import functools

import mujoco
import numpy as np
from gymnasium import utils
from gymnasium.envs.mujoco import ant_v5

from . import rewards
from .base import SCALE_DOC, FrictionScaleMixin, MassScaleMixin, TaskEnvMixin, check_fixed_kwargs

# leg i: (its top body, the body below the hip, hip joint, ankle joint)
LEGS = (("front_left_leg", "aux_1", "hip_1", "ankle_1"), ("front_right_leg", "aux_2", "hip_2", "ankle_2"),
        ("back_leg", "aux_3", "hip_3", "ankle_3"), ("right_back_leg", "aux_4", "hip_4", "ankle_4"))
RED = np.array([0.9, 0.1, 0.1, 1.0])


class AntTaskEnv(TaskEnvMixin, ant_v5.AntEnv):
    """Base: Ant v5 + the task API; subclasses define the tasks.

    ``compose``: None (default) or the extra scale keys every task carries (``("mass_scale",)``,
    ``("friction_scale",)`` or both, or a dict with their ranges; see
    :func:`lit_meta.envs.base.check_compose`).
    """

    def __init__(self, task_split: str = "train", change_every: int | None = None, *,
                 forward_reward_weight: float = 1.0, ctrl_cost_weight: float = 0.5, contact_cost_weight: float = 5e-4,
                 healthy_reward: float = 1.0, terminate_when_unhealthy: bool = True,
                 healthy_z_range: tuple[float, float] = (0.2, 1.0), contact_force_range: tuple[float, float] = (-1.0, 1.0),
                 reset_noise_scale: float = 0.1, frame_skip: int = 5, default_camera_config: dict | None = None,
                 compose=None, **kwargs):
        check_fixed_kwargs(type(self).__name__, kwargs, {
            "xml_file": None, "exclude_current_positions_from_observation": False,
            "include_cfrc_ext_in_observation": True, "main_body": 1})
        self._init_task_api(task_split, change_every, compose)
        if kwargs.get("camera_id") is None and kwargs.get("camera_name") is None:
            kwargs["camera_name"] = "track"  # the model's com-tracking camera: the robot stays in view
        ant_v5.AntEnv.__init__(
            self, xml_file="ant.xml", frame_skip=frame_skip,
            default_camera_config=dict(default_camera_config or ant_v5.DEFAULT_CAMERA_CONFIG),
            forward_reward_weight=forward_reward_weight, ctrl_cost_weight=ctrl_cost_weight,
            contact_cost_weight=contact_cost_weight, healthy_reward=healthy_reward, main_body=1,
            terminate_when_unhealthy=terminate_when_unhealthy, healthy_z_range=tuple(healthy_z_range),
            contact_force_range=tuple(contact_force_range), reset_noise_scale=reset_noise_scale,
            exclude_current_positions_from_observation=False, include_cfrc_ext_in_observation=True, **kwargs)
        self._robot_body_ids = list(range(1, self.model.nbody))
        self.reward_fn = functools.partial(
            rewards.ant_reward, dt=self.dt, forward_reward_weight=forward_reward_weight,
            ctrl_cost_weight=ctrl_cost_weight, contact_cost_weight=contact_cost_weight,
            healthy_reward=healthy_reward, healthy_z_range=tuple(healthy_z_range),
            **rewards.action_bounds(self.action_space))
        self.termination_fn = functools.partial(rewards.ant_termination, healthy_z_range=tuple(healthy_z_range),
                                                terminate_when_unhealthy=terminate_when_unhealthy)
        self._setup()

    def _ezpickle(self, **kwargs) -> None:
        utils.EzPickle.__init__(self, **kwargs)

    def _setup(self) -> None:
        """Hook: look up ids in the compiled model."""

    def _step_mujoco_simulation(self, ctrl, n_frames):
        super()._step_mujoco_simulation(ctrl, n_frames)  # mj_step x n + mj_rnePostConstraint (cfrc_ext)
        mujoco.mj_kinematics(self.model, self.data)  # xpos of the final qpos (for the v5 reward, rendering)


class AntCrippledLegEnv(AntTaskEnv):
    """Crippled legs: each one's hip and ankle actuators off (gear 0), its two lower segments shrunk to
    ``shrink`` of their length (geoms and the ankle body moved with them) and drawn red; the masses are
    unchanged. Task ``{"crippled_leg": 0-3}``, -1 for the intact ant (None accepted too; an int either way, so
    vector-env infos stack), task vector one-hot over the 4 legs (zero = intact).
    Legs: 0 front-left (hip_1), 1 front-right (hip_2), 2 back-left (hip_3), 3 back-right (hip_4).
    Default split (as in the issue): train legs 0-2 or intact, test leg 3 (never crippled in training).

    Several legs at once: an entry of ``train_legs`` / ``test_legs`` may be a tuple of legs, e.g.
    ``train_legs=(0, 1, 2, (0, 2))``; the task then names a list, ``{"crippled_leg": [0, 2]}``, and the
    task vector is multi-hot. An env whose splits hold such a combination reports every task's
    ``crippled_leg`` as a sorted list of legs (``[]`` = intact; one type per key, so vector-env infos
    stack); without one, as an int. A task belongs to a split if its set of legs is one of the split's
    entries; no set may be in both. ``compose=("mass_scale",)`` etc. add scale keys to every task.

    Actions outside ``[-1, 1]`` are clipped (physics and control cost, ``info["action_clipped"]``);
    the control cost is charged on the (clipped) action of every actuator, as ``reward_fn`` sees it.
    """

    task_dim = len(LEGS)

    def __init__(self, task_split: str = "train", change_every: int | None = None, *, train_legs=(0, 1, 2),
                 test_legs=(3,), train_intact: bool = True, shrink: float = 0.5, **kwargs):
        name = type(self).__name__
        train_sets = [self._leg_set(v) for v in train_legs]
        test_sets = [self._leg_set(v) for v in test_legs]
        if () in train_sets + test_sets:
            raise ValueError(f"{name}: -1/None (intact) is not allowed in train_legs/test_legs: use train_intact=True")
        self._multi = any(len(legs) > 1 for legs in train_sets + test_sets)
        self.train_legs = tuple(self._value(legs) for legs in train_sets)
        self.test_legs = tuple(self._value(legs) for legs in test_sets)
        if set(train_sets) & set(test_sets):
            both = [self._value(legs) for legs in train_sets if legs in test_sets]
            raise ValueError(f"{name}: train_legs {self.train_legs} and test_legs {self.test_legs} overlap (both hold "
                             f"{both[0]!r}): make them disjoint so the test legs stay unseen")
        if not test_sets or not (train_sets or train_intact):
            raise ValueError(f"{name}: each split needs at least one task: got train_legs={self.train_legs}, "
                             f"train_intact={train_intact}, test_legs={self.test_legs}")
        if not (isinstance(shrink, (int, float)) and 0 < shrink <= 1):
            raise ValueError(f"{name}: shrink={shrink!r} is not allowed: use a number in (0, 1] (1 = no shrinking)")
        self.train_intact, self.shrink = bool(train_intact), float(shrink)
        self._split_sets = {"train": train_sets + ([()] if self.train_intact else []), "test": test_sets}
        super().__init__(task_split, change_every, **kwargs)
        self._ezpickle(task_split=task_split, change_every=change_every, train_legs=train_legs, test_legs=test_legs,
                       train_intact=train_intact, shrink=shrink, **kwargs)

    @classmethod
    def _leg(cls, value):
        if value is None or value == -1 or isinstance(value, str) and value.lower() == "none":
            return -1
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(LEGS):
            return int(value)
        raise ValueError(f"{cls.__name__}: unknown leg {value!r}: use 0 (front-left), 1 (front-right), 2 (back-left), "
                         f"3 (back-right), or -1 (or None) for the intact ant")

    @classmethod
    def _leg_set(cls, value) -> tuple[int, ...]:
        """The crippled legs of a ``crippled_leg`` value (a leg, -1/None, or a list/tuple of legs), sorted;
        ``()`` = intact."""
        if isinstance(value, (list, tuple)):
            legs = [cls._leg(v) for v in value]
            if -1 in legs:
                raise ValueError(f"{cls.__name__}: crippled_leg={value!r} is not allowed: -1/None (intact) cannot be "
                                 f"in a list of legs; use -1 alone (or []) for the intact ant")
            twice = next((leg for leg in legs if legs.count(leg) > 1), None)
            if twice is not None:
                raise ValueError(f"{cls.__name__}: crippled_leg={value!r} is not allowed: leg {twice} appears twice; "
                                 f"name each leg once")
            return tuple(sorted(legs))
        leg = cls._leg(value)
        return () if leg < 0 else (leg,)

    def _value(self, legs: tuple[int, ...]):
        """The task value of a leg set: an int (-1 = intact), or a list where the splits hold combinations."""
        if self._multi or len(legs) > 1:
            return list(legs)
        return legs[0] if legs else -1

    def _setup(self):
        m = self.model
        self._leg_actuators, self._leg_geoms, self._leg_bodies = [], [], []
        for _, aux, hip, ankle in LEGS:
            joints = {m.joint(hip).id, m.joint(ankle).id}
            self._leg_actuators.append([a for a in range(m.nu) if m.actuator_trnid[a, 0] in joints])
            aux_id = m.body(aux).id
            lower = [b for b in range(m.nbody) if m.body_parentid[b] == aux_id]  # the ankle body
            self._leg_bodies.append(lower)
            self._leg_geoms.append([g for g in range(m.ngeom) if m.geom_bodyid[g] in [aux_id, *lower]])
        self._orig = {k: getattr(m, k).copy() for k in ("actuator_gear", "geom_size", "geom_pos", "geom_rgba", "body_pos")}

    def _split_tasks(self, split):
        return tuple(self._value(legs) for legs in self._split_sets[split])

    def _sample_task(self, rng):
        sets = self._split_sets[self.task_split]
        return {"crippled_leg": self._value(sets[int(rng.integers(len(sets)))])}

    def _normalize_task(self, task, split):
        name = type(self).__name__
        if isinstance(task, dict):
            if set(task) != {"crippled_leg"}:
                raise ValueError(f"{name}: task {task!r} is not allowed: expected {{'crippled_leg': 0-3, -1 for the "
                                 f"intact ant, or a list of legs}}")
            task = task["crippled_leg"]
        legs = self._leg_set(task)
        value = self._value(legs)
        if split is not None and legs not in self._split_sets[split]:
            other = "test" if split == "train" else "train"
            if legs in self._split_sets[other]:
                raise ValueError(f"{name}: crippled_leg={value!r} is not a {split} task (task_split={split!r} allows "
                                 f"{self._split_tasks(split)}); create the env with task_split={other!r} for it")
            raise ValueError(f"{name}: crippled_leg={value!r} is in neither split (train: {self._split_tasks('train')}; "
                             f"test: {self._split_tasks('test')}); add it to the env's train_legs or test_legs (a "
                             f"tuple of legs for a combination, e.g. train_legs=(..., {legs!r}))")
        return {"crippled_leg": value}

    def _encode_task(self, task):
        v = np.zeros(len(LEGS))
        for leg in self._leg_set(task["crippled_leg"]):
            v[leg] = 1.0
        return v

    def _apply_task(self, task):
        m = self.model
        for key, value in self._orig.items():
            getattr(m, key)[:] = value
        for leg in self._leg_set(task["crippled_leg"]):
            m.actuator_gear[self._leg_actuators[leg]] = 0.0
            for g in self._leg_geoms[leg]:
                # capsules from their body's origin (fromto="0 0 0 ..."): shrink towards the origin
                m.geom_size[g, 1] *= self.shrink
                m.geom_pos[g] *= self.shrink
                m.geom_rgba[g] = RED
            for b in self._leg_bodies[leg]:
                m.body_pos[b] *= self.shrink


class AntMassEnv(MassScaleMixin, AntTaskEnv):
    __doc__ = ("All the ant's body masses and inertias scaled by one factor (``mj_setConst`` refreshes the "
               "derived constants). " + SCALE_DOC.format(key="mass_scale"))


class AntFrictionEnv(FrictionScaleMixin, AntTaskEnv):
    __doc__ = "All friction coefficients (ant and floor) scaled by one factor. " + SCALE_DOC.format(key="friction_scale")
