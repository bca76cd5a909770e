"""Perturbed HalfCheetah envs (GrBAL/ReBAL, Nagabandi et al. 2019) on gymnasium's ``HalfCheetah-v5``.

Every env subclasses :class:`gymnasium.envs.mujoco.half_cheetah_v5.HalfCheetahEnv` with the official
``half_cheetah.xml`` (edited as a string only where the world changes: height field, pier), the v5
reward, and the observation ``qpos[0:9] + qvel[0:9]`` (18, float64) *including* the x position, so
that :func:`lit_meta.envs.rewards.half_cheetah_reward` computes the reward from transitions.

Tasks (see each class): ``HalfCheetahCrippledJoint``, ``HalfCheetahSlopes``, ``HalfCheetahPier``,
``HalfCheetahMass``, ``HalfCheetahFriction``. Common kwargs: ``task_split``, ``change_every``,
``compose`` (default None: extra ``mass_scale`` / ``friction_scale`` keys every task carries, applied on
top of the env's own perturbation, one task-vector entry each; see :func:`lit_meta.envs.base.check_compose`),
the v5 reward weights, ``frame_skip``, ``reset_noise_scale`` and the MuJoCo render kwargs.

Actions (6, float32, ``[-1, 1]`` per actuator): an action outside ``[-1, 1]`` is clipped before the
physics and the control cost, and the step's ``info["action_clipped"]`` is True (False otherwise);
``reward_fn`` clips the same way. Mid-episode task switches from user code: ``env.unwrapped.set_task``,
or :func:`lit_meta.envs.set_task` through wrappers / on vector envs (see :mod:`lit_meta.envs.base`).
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import mujoco
import numpy as np
from gymnasium import utils
from gymnasium.envs.mujoco import half_cheetah_v5
from gymnasium.spaces import Box

from . import rewards, terrain
from .base import SCALE_DOC, FrictionScaleMixin, MassScaleMixin, TaskEnvMixin, check_fixed_kwargs, check_ranges, \
    fmt_ranges, in_ranges, ranges_overlap, sample_ranges

JOINTS = ("bthigh", "bshin", "bfoot", "fthigh", "fshin", "ffoot")  # = actuator order
BODIES = ("torso", "bthigh", "bshin", "bfoot", "fthigh", "fshin", "ffoot")
NQ = NV = 9  # the cheetah's own dofs (extra bodies, e.g. pier blocks, come after them)
TOTAL_MASS = 14.0  # settotalmass of the official model
RED = np.array([0.9, 0.1, 0.1, 1.0])


@functools.lru_cache(maxsize=1)
def official_xml() -> str:
    """gymnasium's ``half_cheetah.xml`` as a string."""
    return (Path(half_cheetah_v5.__file__).parent / "assets" / "half_cheetah.xml").read_text()


def cheetah_xml(*, floor: str | None = None, assets: str = "", world: str = "") -> str:
    """The official model with ``settotalmass`` removed (applied after compiling, to the cheetah's bodies
    only), the floor geom replaced by ``floor`` (if given) and extra ``assets`` / ``world`` elements."""
    xml = official_xml()

    def sub(pattern, repl, text):
        new, n = re.subn(pattern, lambda _: repl, text, count=1)
        if n != 1:
            raise RuntimeError(f"gymnasium's half_cheetah.xml changed: {pattern!r} not found; update lit_meta.envs")
        return new

    xml = sub(r'\s+settotalmass="14"', "", xml)
    if floor is not None:
        xml = sub(r'<geom[^>]*name="floor"[^>]*/>', floor, xml)
    if assets:
        xml = sub(r"</asset>", assets + "\n  </asset>", xml)
    if world:
        xml = sub(r"</worldbody>", world + "\n  </worldbody>", xml)
    return xml


@functools.lru_cache(maxsize=1)
def _reference_stat() -> tuple[float, np.ndarray]:
    model = mujoco.MjModel.from_xml_string(cheetah_xml())
    return float(model.stat.extent), model.stat.center.copy()


class HalfCheetahTaskEnv(TaskEnvMixin, half_cheetah_v5.HalfCheetahEnv):
    """Base: HalfCheetah v5 + the task API; subclasses define the tasks (and may edit the XML).

    ``compose``: None (default) or the extra scale keys every task carries (``("mass_scale",)``,
    ``("friction_scale",)`` or both, or a dict with their ranges; see
    :func:`lit_meta.envs.base.check_compose`); mass scales the cheetah's bodies only.
    """

    def __init__(self, task_split: str = "train", change_every: int | None = None, *,
                 forward_reward_weight: float = 1.0, ctrl_cost_weight: float = 0.1, reset_noise_scale: float = 0.1,
                 frame_skip: int = 5, default_camera_config: dict | None = None, compose=None, **kwargs):
        check_fixed_kwargs(type(self).__name__, kwargs,
                           {"xml_file": None, "exclude_current_positions_from_observation": False})
        self._init_task_api(task_split, change_every, compose)
        if kwargs.get("camera_id") is None and kwargs.get("camera_name") is None:
            kwargs["camera_name"] = "track"  # the model's com-tracking camera: the robot stays in view
        half_cheetah_v5.HalfCheetahEnv.__init__(
            self, xml_file="half_cheetah.xml", frame_skip=frame_skip,
            default_camera_config=dict(default_camera_config or half_cheetah_v5.DEFAULT_CAMERA_CONFIG),
            forward_reward_weight=forward_reward_weight, ctrl_cost_weight=ctrl_cost_weight,
            reset_noise_scale=reset_noise_scale, exclude_current_positions_from_observation=False, **kwargs)
        self.observation_space = Box(low=-np.inf, high=np.inf, shape=(NQ + NV,), dtype=np.float64)
        self.observation_structure = {"skipped_qpos": 0, "qpos": NQ, "qvel": NV}
        self._robot_body_ids = [self.model.body(b).id for b in BODIES]
        self.reward_fn = functools.partial(rewards.half_cheetah_reward, dt=self.dt,
                                           forward_reward_weight=forward_reward_weight,
                                           ctrl_cost_weight=ctrl_cost_weight, **rewards.action_bounds(self.action_space))
        self.termination_fn = rewards.half_cheetah_termination
        self._setup()

    def _ezpickle(self, **kwargs) -> None:
        utils.EzPickle.__init__(self, **kwargs)  # rebuild with *our* kwargs (v5 stored its own)

    def _xml(self) -> str:
        return cheetah_xml()

    def _setup(self) -> None:
        """Hook: look up ids in the compiled model."""

    def _initialize_simulation(self):
        model = mujoco.MjModel.from_xml_string(self._xml())
        ids = [model.body(b).id for b in BODIES]
        scale = TOTAL_MASS / model.body_mass[ids].sum()
        model.body_mass[ids] *= scale
        model.body_inertia[ids] *= scale
        mujoco.mj_setConst(model, mujoco.MjData(model))
        # big extra geoms (land boxes) would inflate the model extent, and with it the camera's near plane
        model.stat.extent, model.stat.center = _reference_stat()
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        return model, mujoco.MjData(model)

    def _get_obs(self):
        return np.concatenate((self.data.qpos[:NQ], self.data.qvel[:NV]))


# --------------------------------------------------------------------------------------------------
def _joint_name(value, name: str) -> str:
    if value is None or isinstance(value, str) and value.lower() == "none":
        return "none"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(JOINTS):
        return JOINTS[int(value)]
    if isinstance(value, str) and value in JOINTS:
        return value
    raise ValueError(f"{name}: unknown joint {value!r}: use one of {JOINTS} (or its index 0-5), or 'none' (or "
                     f"None) for the intact cheetah")


def _joint_set(value, name: str) -> tuple[str, ...]:
    """The crippled joints of a ``crippled_joint`` value (a joint, 'none'/None, or a list/tuple of joints),
    in actuator order; ``()`` = intact."""
    if isinstance(value, (list, tuple)):
        joints = [_joint_name(v, name) for v in value]
        if "none" in joints:
            raise ValueError(f"{name}: crippled_joint={value!r} is not allowed: 'none' (None) cannot be in a list of "
                             f"joints; use 'none' alone (or []) for the intact cheetah")
        twice = next((j for j in joints if joints.count(j) > 1), None)
        if twice is not None:
            raise ValueError(f"{name}: crippled_joint={value!r} is not allowed: joint {twice!r} appears twice; name "
                             f"each joint once")
        return tuple(j for j in JOINTS if j in joints)
    joint = _joint_name(value, name)
    return () if joint == "none" else (joint,)


class HalfCheetahCrippledJointEnv(HalfCheetahTaskEnv):
    """Crippled joints: their actuators disabled (gear set to 0: the action has no effect; limbs drawn red).

    Task ``{"crippled_joint": name}`` with ``"none"`` for the intact cheetah (None is accepted too; a
    string either way, so vector-env infos stack); task vector: one-hot over the 6 actuated joints
    (all zero = intact). Default split, disjoint: train = {bthigh, bfoot, fthigh, ffoot} or none (intact);
    test = the held-out shins {bshin, fshin} (one per leg, never disabled in training).

    Several joints at once: an entry of ``train_joints`` / ``test_joints`` may be a tuple of joints,
    e.g. ``train_joints=("bthigh", "ffoot", ("bthigh", "ffoot"))``; the task then names a list,
    ``{"crippled_joint": ["bthigh", "ffoot"]}``, and the task vector is multi-hot. An env whose splits
    hold such a combination reports every task's ``crippled_joint`` as a list of joints in actuator
    order (``[]`` = intact; one type per key, so vector-env infos stack); without one, as above. A task
    belongs to a split if its set of joints is one of the split's entries; no set may be in both.
    ``compose=("mass_scale",)`` etc. add scale keys to every task (see :class:`HalfCheetahTaskEnv`).

    Actions outside ``[-1, 1]`` are clipped (physics and control cost, ``info["action_clipped"]``);
    the control cost is charged on the (clipped) action of every joint, crippled or not, as
    ``reward_fn`` sees it.
    """

    task_dim = len(JOINTS)

    def __init__(self, task_split: str = "train", change_every: int | None = None, *,
                 train_joints=("bthigh", "bfoot", "fthigh", "ffoot"), test_joints=("bshin", "fshin"),
                 train_intact: bool = True, **kwargs):
        name = type(self).__name__
        train_sets = [_joint_set(j, name) for j in train_joints]
        test_sets = [_joint_set(j, name) for j in test_joints]
        if () in train_sets + test_sets:
            raise ValueError(f"{name}: 'none' is not allowed in train_joints/test_joints: use train_intact=True to "
                             f"include the intact cheetah in training")
        self._multi = any(len(js) > 1 for js in train_sets + test_sets)
        self.train_joints = tuple(self._value(js) for js in train_sets)
        self.test_joints = tuple(self._value(js) for js in test_sets)
        if set(train_sets) & set(test_sets):
            both = [self._value(js) for js in train_sets if js in test_sets]
            raise ValueError(f"{name}: train_joints {self.train_joints} and test_joints {self.test_joints} overlap "
                             f"(both hold {both[0]!r}): make them disjoint so the test joints stay unseen")
        if not test_sets or not (train_sets or train_intact):
            raise ValueError(f"{name}: each split needs at least one task: got train_joints={self.train_joints}, "
                             f"train_intact={train_intact}, test_joints={self.test_joints}")
        self.train_intact = bool(train_intact)
        self._split_sets = {"train": train_sets + ([()] if self.train_intact else []), "test": test_sets}
        super().__init__(task_split, change_every, **kwargs)
        self._ezpickle(task_split=task_split, change_every=change_every, train_joints=train_joints,
                       test_joints=test_joints, train_intact=train_intact, **kwargs)

    def _value(self, joints: tuple[str, ...]):
        """The task value of a joint set: a name / "none", or a list where the splits hold combinations."""
        if self._multi or len(joints) > 1:
            return list(joints)
        return joints[0] if joints else "none"

    def _setup(self):
        self._actuator = {j: self.model.actuator(j).id for j in JOINTS}
        self._geom = {j: self.model.geom(j).id for j in JOINTS}
        self._orig_gear = self.model.actuator_gear.copy()
        self._orig_rgba = self.model.geom_rgba.copy()

    def _split_tasks(self, split):
        return tuple(self._value(js) for js in self._split_sets[split])

    def _sample_task(self, rng):
        sets = self._split_sets[self.task_split]
        return {"crippled_joint": self._value(sets[int(rng.integers(len(sets)))])}

    def _normalize_task(self, task, split):
        name = type(self).__name__
        if isinstance(task, dict):
            if set(task) != {"crippled_joint"}:
                raise ValueError(f"{name}: task {task!r} is not allowed: expected {{'crippled_joint': <joint name, "
                                 f"'none', or a list of joints>}}, joints {JOINTS}")
            task = task["crippled_joint"]
        joints = _joint_set(task, name)
        value = self._value(joints)
        if split is not None and joints not in self._split_sets[split]:
            other = "test" if split == "train" else "train"
            if joints in self._split_sets[other]:
                raise ValueError(f"{name}: crippled_joint={value!r} is not a {split} task (task_split={split!r} allows "
                                 f"{self._split_tasks(split)}); create the env with task_split={other!r} for it")
            raise ValueError(f"{name}: crippled_joint={value!r} is in neither split (train: "
                             f"{self._split_tasks('train')}; test: {self._split_tasks('test')}); add it to the "
                             f"env's train_joints or test_joints (a tuple of joints for a combination, e.g. "
                             f"train_joints=(..., {tuple(joints)!r}))")
        return {"crippled_joint": value}

    def _encode_task(self, task):
        v = np.zeros(len(JOINTS))
        for joint in _joint_set(task["crippled_joint"], type(self).__name__):
            v[JOINTS.index(joint)] = 1.0
        return v

    def _apply_task(self, task):
        self.model.actuator_gear[:] = self._orig_gear
        self.model.geom_rgba[:] = self._orig_rgba
        for joint in _joint_set(task["crippled_joint"], type(self).__name__):
            self.model.actuator_gear[self._actuator[joint]] = 0.0
            self.model.geom_rgba[self._geom[joint]] = RED


# --------------------------------------------------------------------------------------------------
class HalfCheetahSlopesEnv(HalfCheetahTaskEnv):
    """Running over a MuJoCo height-field terrain (see :mod:`lit_meta.envs.terrain`).

    Task ``{"terrain": "random" | name, "slopes": [n_segments floats]}``; task vector = the slopes.
    train: random slopes U(-max_slope, max_slope) per ``segment_length`` m segment; test: the named
    held-out terrains basin, hill, gentle, steep. The terrain starts flat at height 0 (the cheetah
    starts at x=0, slopes start at x=2) and stays flat at its last height after ``n_segments``
    segments. ``model.hfield_data`` is rewritten at each task change (no recompilation) and
    re-uploaded to live render contexts, so ``rgb_array`` frames show the current terrain.
    """

    X_MIN, SLOPE_START, RUNOUT = -10.0, 2.0, 20.0

    def __init__(self, task_split: str = "train", change_every: int | None = None, *, n_segments: int = 20,
                 segment_length: float = 5.0, max_slope: float = 0.2, max_height: float = 10.0,
                 resolution: float = 0.1, **kwargs):
        name = type(self).__name__
        for key, value in (("segment_length", segment_length), ("max_slope", max_slope),
                           ("max_height", max_height), ("resolution", resolution)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: {key}={value!r} is not allowed: it must be a finite number > 0")
        if isinstance(n_segments, bool) or not isinstance(n_segments, int) or n_segments < 1:
            raise ValueError(f"{name}: n_segments={n_segments!r} is not allowed: use a positive int")
        self.n_segments, self.segment_length = n_segments, float(segment_length)
        self.max_slope, self.max_height, self.resolution = float(max_slope), float(max_height), float(resolution)
        self.task_dim = n_segments
        self._x_max = self.SLOPE_START + n_segments * self.segment_length + self.RUNOUT
        self._ncol = int(round((self._x_max - self.X_MIN) / self.resolution)) + 1
        for t in terrain.TEST_TERRAINS:  # fail at construction, not at the first test reset
            self._rows(terrain.named_slopes(t, n_segments))
        super().__init__(task_split, change_every, **kwargs)
        self._ezpickle(task_split=task_split, change_every=change_every, n_segments=n_segments,
                       segment_length=segment_length, max_slope=max_slope, max_height=max_height,
                       resolution=resolution, **kwargs)

    def _rows(self, slopes):
        return terrain.hfield_rows(slopes, x_min=self.X_MIN, x_max=self._x_max, ncol=self._ncol, nrow=2,
                                   slope_start=self.SLOPE_START, segment_length=self.segment_length,
                                   max_height=self.max_height)

    def _xml(self):
        h, half = self.max_height, (self._x_max - self.X_MIN) / 2
        assets = f'    <hfield name="terrain" nrow="2" ncol="{self._ncol}" size="{half} 1 {2 * h} 1"/>'
        floor = (f'<geom name="terrain" type="hfield" hfield="terrain" pos="{self.X_MIN + half} 0 {-h}" '
                 f'conaffinity="1" condim="3" rgba="0.75 0.7 0.55 1"/>\n'
                 f'    <geom name="land_start" type="box" size="500 1 0.5" pos="{self.X_MIN - 500} 0 -0.5" '
                 f'conaffinity="1" condim="3" rgba="0.8 0.9 0.8 1"/>\n'
                 f'    <geom name="land_end" type="box" size="500 1 0.5" pos="{self._x_max + 500} 0 -0.5" '
                 f'conaffinity="1" condim="3" rgba="0.8 0.9 0.8 1"/>')
        return cheetah_xml(floor=floor, assets=assets)

    def _setup(self):
        self._hfield = self.model.hfield("terrain").id
        self._land_end = self.model.geom("land_end").id

    def _sample_task(self, rng):
        if self.task_split == "train":
            return {"terrain": "random", "slopes": terrain.random_slopes(
                rng, self.n_segments, self.max_slope, self.segment_length, self.max_height)}
        name = terrain.TEST_TERRAINS[int(rng.integers(len(terrain.TEST_TERRAINS)))]
        return {"terrain": name, "slopes": terrain.named_slopes(name, self.n_segments)}

    def _normalize_task(self, task, split):
        name = type(self).__name__
        if isinstance(task, str):
            task = {"terrain": task}
        if not isinstance(task, dict) or "terrain" not in task or not set(task) <= {"terrain", "slopes"}:
            raise ValueError(f"{name}: task {task!r} is not allowed: use {{'terrain': one of "
                             f"{terrain.TEST_TERRAINS}}} (test) or {{'terrain': 'random', 'slopes': [...]}} (train)")
        kind = task["terrain"]
        if kind == "random":
            if split == "test":
                raise ValueError(f"{name}: a random-slope terrain is a train task but task_split='test' (allows "
                                 f"{terrain.TEST_TERRAINS}); create the env with task_split='train' for it")
            slopes = task.get("slopes")
            try:
                slopes = [float(s) for s in slopes]
            except (TypeError, ValueError):
                raise ValueError(f"{name}: task {task!r}: a random terrain needs 'slopes', a list of "
                                 f"{self.n_segments} numbers") from None
            if len(slopes) != self.n_segments or not all(math.isfinite(s) and abs(s) <= self.max_slope + 1e-12
                                                         for s in slopes):
                raise ValueError(f"{name}: task {task!r}: 'slopes' must be {self.n_segments} finite numbers with "
                                 f"|slope| <= max_slope={self.max_slope}")
            self._rows(slopes)  # raises if the heights leave the field
            return {"terrain": "random", "slopes": slopes}
        if kind not in terrain.TEST_TERRAINS:
            raise ValueError(f"{name}: unknown terrain {kind!r}: use one of {terrain.TEST_TERRAINS} (test) or "
                             f"'random' with 'slopes' (train)")
        if split == "train":
            raise ValueError(f"{name}: terrain {kind!r} is a held-out test task but task_split='train' (allows only "
                             f"random slopes); create the env with task_split='test' for it")
        slopes = terrain.named_slopes(kind, self.n_segments)
        if "slopes" in task and [float(s) for s in task["slopes"]] != slopes:
            raise ValueError(f"{name}: task {task!r}: the slopes of the named terrain {kind!r} are fixed; drop "
                             f"'slopes' or give exactly {slopes}")
        return {"terrain": kind, "slopes": slopes}

    def _encode_task(self, task):
        return np.asarray(task["slopes"], dtype=np.float64)

    def _apply_task(self, task):
        self.model.hfield_data[:] = self._rows(task["slopes"])
        end_height = terrain.height_at(self._x_max, task["slopes"], self.SLOPE_START, self.segment_length)
        self.model.geom_pos[self._land_end, 2] = float(end_height) - 0.5
        # live OpenGL contexts hold a copy of the height field: upload the new one
        for viewer in getattr(self.mujoco_renderer, "_viewers", {}).values():
            viewer.make_context_current()
            mujoco.mjr_uploadHField(self.model, viewer.con, self._hfield)

    def terrain_height(self, x) -> np.ndarray:
        """Height of the current terrain at x (m)."""
        return terrain.height_at(x, self._task["slopes"], self.SLOPE_START, self.segment_length)


# --------------------------------------------------------------------------------------------------
class HalfCheetahPierEnv(HalfCheetahTaskEnv):
    """A floating pier: ``n_blocks`` blocks along the track, each on a vertical spring (buoyancy,
    ``block_stiffness``) with its own damping, so the dynamics change as the cheetah runs.

    The blocks are weightless (``gravcomp``), slide only vertically (range -0.4..0.1 m) and collide only
    with the cheetah; their top is at z=0 at rest, with land (boxes) before and after the pier and
    water (visual only) below. The pier starts at ``pier_start`` (default -1.5: the cheetah starts on
    it). Task ``{"damping": [n_blocks floats]}`` (N s/m), task vector = the dampings; train: each
    block U(0, 10) (paper); test: each block U(10, 20) (disjoint, default ``test_damping_range``).
    Blocks are drawn darker the higher their damping. Observations are the cheetah's only (18); the
    blocks' state is hidden, as in the paper.
    """

    def __init__(self, task_split: str = "train", change_every: int | None = None, *, n_blocks: int = 30,
                 block_length: float = 1.0, pier_start: float = -1.5, block_stiffness: float = 1000.0,
                 block_mass: float = 5.0, train_damping_range=(0.0, 10.0), test_damping_range=(10.0, 20.0),
                 **kwargs):
        name = type(self).__name__
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
            raise ValueError(f"{name}: n_blocks={n_blocks!r} is not allowed: use a positive int")
        for key, value in (("block_length", block_length), ("block_stiffness", block_stiffness),
                           ("block_mass", block_mass)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: {key}={value!r} is not allowed: it must be a finite number > 0")
        if not (isinstance(pier_start, (int, float)) and math.isfinite(pier_start)):
            raise ValueError(f"{name}: pier_start={pier_start!r} is not allowed: it must be a finite number (m)")
        self._train_ranges = check_ranges(f"{name} train_damping_range", train_damping_range, nonnegative=True)
        self._test_ranges = check_ranges(f"{name} test_damping_range", test_damping_range, nonnegative=True)
        if ranges_overlap(self._train_ranges, self._test_ranges):
            raise ValueError(f"{name}: train_damping_range {fmt_ranges(self._train_ranges)} and test_damping_range "
                             f"{fmt_ranges(self._test_ranges)} overlap: make them disjoint")
        self.n_blocks, self.block_length, self.pier_start = n_blocks, float(block_length), float(pier_start)
        self.block_stiffness, self.block_mass = float(block_stiffness), float(block_mass)
        self.task_dim = n_blocks
        super().__init__(task_split, change_every, **kwargs)
        self._ezpickle(task_split=task_split, change_every=change_every, n_blocks=n_blocks, block_length=block_length,
                       pier_start=pier_start, block_stiffness=block_stiffness, block_mass=block_mass,
                       train_damping_range=train_damping_range, test_damping_range=test_damping_range, **kwargs)

    @property
    def pier_end(self) -> float:
        return self.pier_start + self.n_blocks * self.block_length

    def _xml(self):
        # land: contype 2 so it touches the cheetah (contype 1 -> conaffinity 1) but not the blocks;
        # blocks: contype 0 / conaffinity 1, so they touch only the cheetah
        s, e = self.pier_start, self.pier_end
        floor = (f'<geom name="water" type="plane" size="0 0 1" pos="0 0 -0.6" contype="0" conaffinity="0" '
                 f'rgba="0.2 0.4 0.8 1"/>\n'
                 f'    <geom name="land_start" type="box" size="500 1 0.5" pos="{s - 500} 0 -0.5" contype="2" '
                 f'conaffinity="1" condim="3" material="MatPlane" rgba="0.8 0.9 0.8 1"/>\n'
                 f'    <geom name="land_end" type="box" size="500 1 0.5" pos="{e + 500} 0 -0.5" contype="2" '
                 f'conaffinity="1" condim="3" material="MatPlane" rgba="0.8 0.9 0.8 1"/>')
        half = self.block_length / 2
        blocks = []
        for i in range(self.n_blocks):
            x = s + (i + 0.5) * self.block_length
            blocks.append(
                f'    <body name="block{i}" pos="{x} 0 0" gravcomp="1">\n'
                f'      <joint name="block{i}" type="slide" axis="0 0 1" limited="true" range="-0.4 0.1" '
                f'stiffness="{self.block_stiffness}" damping="0" armature="0"/>\n'
                f'      <geom name="block{i}" type="box" size="{half - 0.01} 1 0.1" pos="0 0 -0.1" '
                f'mass="{self.block_mass}" contype="0" conaffinity="1" condim="3" rgba="0.7 0.55 0.35 1"/>\n'
                f'    </body>')
        return cheetah_xml(floor=floor, world="\n".join(blocks))

    def _setup(self):
        self._block_dofs = np.array([self.model.joint(f"block{i}").dofadr[0] for i in range(self.n_blocks)])
        self._block_qpos = np.array([self.model.joint(f"block{i}").qposadr[0] for i in range(self.n_blocks)])
        self._block_geoms = np.array([self.model.geom(f"block{i}").id for i in range(self.n_blocks)])

    def _split_ranges(self, split):
        return self._train_ranges if split == "train" else self._test_ranges

    def _sample_task(self, rng):
        ranges = self._split_ranges(self.task_split)
        return {"damping": [sample_ranges(rng, ranges) for _ in range(self.n_blocks)]}

    def _normalize_task(self, task, split):
        name = type(self).__name__
        if not isinstance(task, dict) or set(task) != {"damping"}:
            raise ValueError(f"{name}: task {task!r} is not allowed: expected {{'damping': [{self.n_blocks} numbers "
                             f">= 0]}}")
        try:
            damping = [float(d) for d in task["damping"]]
        except (TypeError, ValueError):
            raise ValueError(f"{name}: task 'damping' must be a list of {self.n_blocks} numbers") from None
        if len(damping) != self.n_blocks or not all(math.isfinite(d) and d >= 0 for d in damping):
            raise ValueError(f"{name}: task 'damping' must be {self.n_blocks} finite numbers >= 0 (one per block), "
                             f"got {len(damping)} values")
        if split is not None:
            bad = [d for d in damping if not in_ranges(d, self._split_ranges(split))]
            if bad:
                other = "test" if split == "train" else "train"
                raise ValueError(f"{name}: block damping {bad[0]:g} is outside the {split} range "
                                 f"{fmt_ranges(self._split_ranges(split))} (task_split={split!r}); use values in "
                                 f"that range, or task_split={other!r} (range {fmt_ranges(self._split_ranges(other))})")
        return {"damping": damping}

    def _encode_task(self, task):
        return np.asarray(task["damping"], dtype=np.float64)

    def _apply_task(self, task):
        damping = np.asarray(task["damping"])
        self.model.dof_damping[self._block_dofs] = damping
        hi = max(hi for _, hi in self._train_ranges + self._test_ranges)
        shade = 1.0 - 0.6 * np.clip(damping / hi, 0.0, 1.0)
        self.model.geom_rgba[self._block_geoms, :3] = shade[:, None] * np.array([0.8, 0.62, 0.4])

    def reset_model(self):
        super().reset_model()  # task + v5 initial-state noise
        qpos, qvel = self.data.qpos.copy(), self.data.qvel.copy()
        qpos[self._block_qpos] = 0.0  # blocks start at rest
        qvel[self._block_dofs] = 0.0
        self.set_state(qpos, qvel)
        return self._get_obs()


# --------------------------------------------------------------------------------------------------


class HalfCheetahMassEnv(MassScaleMixin, HalfCheetahTaskEnv):
    __doc__ = ("The cheetah's body masses and inertias scaled by one factor (``mj_setConst`` refreshes the "
               "derived constants). " + SCALE_DOC.format(key="mass_scale"))


class HalfCheetahFrictionEnv(FrictionScaleMixin, HalfCheetahTaskEnv):
    __doc__ = ("All friction coefficients (cheetah and floor) scaled by one factor. "
               + SCALE_DOC.format(key="friction_scale"))
