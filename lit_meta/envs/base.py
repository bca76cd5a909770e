"""What every ``lit_meta`` env shares: the task API, mid-episode task switches and the instability guard.

:class:`TaskEnvMixin` sits before a gymnasium v5 MuJoCo class in the MRO and adds

* ``task_split`` ("train" | "test") and ``change_every`` (resample a task of the split every n steps),
* ``reset(options={"task": ...})``, ``get_task()``, ``task_vector()``, ``task_dim``,
* ``info["task"]`` (the task of this transition), ``info["task_vector"]``, ``info["task_changed"]``
  (True on the step whose mid-episode draw gave a different task), ``info["unstable"]``,
  ``info["unstable_reason"]`` ("" when stable) on every step; the task keys on reset. Task values
  keep one type per key (e.g. intact = "none" / -1, not None) so that vector-env infos stack,
* the guard: a non-finite action, a MuJoCo instability warning (bad qpos/qvel/qacc/ctrl) or a
  non-finite state/observation/reward ends the episode with ``truncated=True``, reward 0, the last
  finite observation and ``info["unstable"] = True``, logged once on the ``lit_meta.envs`` logger.

Subclasses implement ``_sample_task``, ``_normalize_task``, ``_apply_task`` and ``_encode_task``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import mujoco
import numpy as np

logger = logging.getLogger("lit_meta.envs")

SPLITS = ("train", "test")
_UNSTABLE_WARNINGS = {
    int(mujoco.mjtWarning.mjWARN_BADQPOS): "bad qpos (NaN, Inf or huge value)",
    int(mujoco.mjtWarning.mjWARN_BADQVEL): "bad qvel (NaN, Inf or huge value)",
    int(mujoco.mjtWarning.mjWARN_BADQACC): "bad qacc (NaN, Inf or huge value)",
    int(mujoco.mjtWarning.mjWARN_BADCTRL): "bad ctrl (NaN, Inf or huge value)",
}


# ----------------------------------------------------------------------------------- argument checks
def check_split(task_split) -> str:
    """Return ``task_split`` if it is "train" or "test", else raise ValueError."""
    if task_split not in SPLITS:
        raise ValueError(f"task_split={task_split!r} is not allowed: use 'train' (meta-training tasks) "
                         f"or 'test' (held-out tasks)")
    return task_split


def check_change_every(change_every) -> int | None:
    """``None`` (tasks change only at reset) or a positive int number of env steps."""
    if change_every is None:
        return None
    if isinstance(change_every, bool) or not isinstance(change_every, (int, np.integer)) or change_every < 1:
        raise ValueError(f"change_every={change_every!r} is not allowed: use None (the task changes only at "
                         f"reset) or a positive int (env steps between mid-episode task changes)")
    return int(change_every)


def check_ranges(name: str, ranges, *, positive: bool = False, nonnegative: bool = False) -> tuple[tuple[float, float], ...]:
    """Normalise one ``(low, high)`` or several into a tuple of ranges, each with finite low < high."""
    if isinstance(ranges, Sequence) and len(ranges) == 2 and all(isinstance(v, (int, float, np.number)) for v in ranges):
        ranges = (ranges,)
    try:
        out = tuple((float(lo), float(hi)) for lo, hi in ranges)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={ranges!r} is not allowed: give (low, high) or a sequence of (low, high) pairs") from None
    for lo, hi in out:
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"{name}={ranges!r} is not allowed: each range needs finite low < high, got ({lo}, {hi})")
        if positive and lo <= 0:
            raise ValueError(f"{name}={ranges!r} is not allowed: scales must be > 0, got low={lo}")
        if nonnegative and lo < 0:
            raise ValueError(f"{name}={ranges!r} is not allowed: values must be >= 0, got low={lo}")
    if not out:
        raise ValueError(f"{name}={ranges!r} is not allowed: give at least one (low, high) range")
    return out


def ranges_overlap(a, b) -> bool:
    """Whether any range of ``a`` overlaps any range of ``b`` (sharing an end point is allowed)."""
    return any(lo1 < hi2 and lo2 < hi1 for lo1, hi1 in a for lo2, hi2 in b)


def in_ranges(x: float, ranges) -> bool:
    return any(lo <= x <= hi for lo, hi in ranges)


def sample_ranges(rng: np.random.Generator, ranges) -> float:
    """Uniform over the union of disjoint ranges (a range is picked with probability ~ its length)."""
    lengths = np.array([hi - lo for lo, hi in ranges])
    i = int(rng.choice(len(ranges), p=lengths / lengths.sum())) if len(ranges) > 1 else 0
    lo, hi = ranges[i]
    return float(rng.uniform(lo, hi))


def fmt_ranges(ranges) -> str:
    return " or ".join(f"[{lo:g}, {hi:g}]" for lo, hi in ranges)


def check_fixed_kwargs(name: str, kwargs: dict, fixed: dict) -> None:
    """Reject gymnasium v5 kwargs that would break the reward-from-observation contract."""
    for key, value in fixed.items():
        if key in kwargs:
            if key == "xml_file" or kwargs[key] != value:
                raise ValueError(f"{name}: {key}={kwargs[key]!r} is not allowed: the lit_meta envs fix {key} "
                                 f"(= {value!r}) so that reward_fn can compute the reward from (obs, action, "
                                 f"next_obs); drop the argument")
            kwargs.pop(key)


def _copy_task(task: dict) -> dict:
    """Copy of a task dict (values: scalars, strings, lists of floats); cheaper than deepcopy per step."""
    return {k: list(v) if isinstance(v, list) else v for k, v in task.items()}


# ----------------------------------------------------------------------------------- the mixin
class TaskEnvMixin:
    """Task API + instability guard for a gymnasium ``MujocoEnv`` subclass (put it first in the bases)."""

    task_dim: int = 0

    def _init_task_api(self, task_split: str, change_every: int | None) -> None:
        self.task_split = check_split(task_split)
        self.change_every = check_change_every(change_every)
        self._task: dict | None = None
        self._requested_task: dict | None = None
        self._steps = 0
        self._needs_reset = False
        self._last_obs: np.ndarray | None = None

    # -- to implement -------------------------------------------------------------------------------
    def _sample_task(self, rng: np.random.Generator) -> dict:
        """A task of ``self.task_split``."""
        raise NotImplementedError

    def _normalize_task(self, task, split: str | None) -> dict:
        """Validate ``task`` (for ``split``; None = either split) and return its canonical dict."""
        raise NotImplementedError

    def _apply_task(self, task: dict) -> None:
        """Change the MuJoCo model for ``task`` (starting from the unperturbed model)."""
        raise NotImplementedError

    def _encode_task(self, task: dict) -> np.ndarray:
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------------------------
    def get_task(self) -> dict:
        """The current task as a plain (JSON-able) dict; ``None`` before the first reset."""
        return None if self._task is None else _copy_task(self._task)

    def task_vector(self, task: dict | None = None) -> np.ndarray:
        """Numeric encoding ``float64[task_dim]`` of ``task`` (default: the current one)."""
        if task is None:
            if self._task is None:
                raise ValueError(f"{type(self).__name__}.task_vector(): no current task before reset(); "
                                 f"call reset() first or pass a task")
            return self._task_vector.copy()
        return np.asarray(self._encode_task(self._normalize_task(task, None)), dtype=np.float64).copy()

    def set_task(self, task) -> None:
        """Switch to ``task`` (of this env's split) now, keeping the physics state (mid-episode change)."""
        self._set_task(self._normalize_task(task, self.task_split))

    def _set_task(self, task: dict) -> None:
        self._apply_task(task)
        self._task = task
        self._task_vector = np.asarray(self._encode_task(task), dtype=np.float64)

    def _task_info(self) -> dict:
        return {"task": _copy_task(self._task), "task_vector": self._task_vector.copy()}

    # -- gymnasium API --------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        task = (options or {}).get("task")
        # validate before touching the simulation, so a bad task leaves the env as it was
        self._requested_task = None if task is None else self._normalize_task(task, self.task_split)
        obs, info = super().reset(seed=seed, options=options)
        self._requested_task = None
        self._steps = 0
        self._needs_reset = False
        self._last_obs = obs.copy()
        self._counts = self._warning_counts()
        info.update(self._task_info())
        return obs, info

    def reset_model(self):
        # called by MujocoEnv.reset after seeding and mj_resetData: set the task, then the initial state
        task = self._requested_task if self._requested_task is not None else self._sample_task(self.np_random)
        self._set_task(task)
        return super().reset_model()

    def step(self, action):
        if self._task is None or self._last_obs is None:
            raise RuntimeError(f"{type(self).__name__}.step() before reset(): call reset() first")
        if self._needs_reset:
            return self._unstable_step("step() after an unstable step without reset(); call reset()", log=False)
        action = np.asarray(action)
        if action.shape != self.action_space.shape:
            raise ValueError(f"{type(self).__name__}.step(): action shape {action.shape} is not allowed: "
                             f"expected {self.action_space.shape}")
        if not np.all(np.isfinite(action)):
            return self._unstable_step(f"non-finite action {np.array2string(action, precision=3)}")
        task_changed = False
        if self.change_every is not None and self._steps > 0 and self._steps % self.change_every == 0:
            new = self._sample_task(self.np_random)
            task_changed = new != self._task
            self._set_task(new)
        obs, reward, terminated, truncated, info = super().step(action)
        self._steps += 1
        reason = self._instability(obs, reward)
        if reason is not None:
            return self._unstable_step(reason, task_changed=task_changed)
        self._last_obs = obs.copy()
        info.update(self._task_info(), task_changed=task_changed, unstable=False, unstable_reason="")
        return obs, float(reward), bool(terminated), bool(truncated), info

    # -- instability guard ----------------------------------------------------------------------------
    def _warning_counts(self) -> list[int]:
        return [self.data.warning[i].number for i in _UNSTABLE_WARNINGS]

    def _instability(self, obs, reward) -> str | None:
        counts = self._warning_counts()  # compared with the counts after the previous step / reset
        if counts != self._counts:
            before, self._counts = self._counts, counts
            i, what = next((i, w) for (i, w), b, c in zip(_UNSTABLE_WARNINGS.items(), before, counts) if c != b)
            return (f"MuJoCo warning: {what} at index {self.data.warning[i].lastinfo} "
                    f"(the simulation diverged and MuJoCo reset its state)")
        # a sum is finite iff every term is (barring overflow of values ~1e308, unstable anyway): one cheap check
        if not math.isfinite(float(self.data.qpos.sum() + self.data.qvel.sum())):
            return "non-finite physics state (qpos/qvel)"
        if not math.isfinite(float(obs.sum())):
            return "non-finite observation"
        if not math.isfinite(reward):
            return f"non-finite reward {reward}"
        return None

    def _unstable_step(self, reason: str, *, task_changed: bool = False, log: bool = True):
        self._needs_reset = True
        if log:
            logger.warning("%s: unstable at step %d: %s -> episode truncated (reward 0, last finite observation, "
                           "info['unstable']=True); call reset()", type(self).__name__, self._steps, reason)
        info = self._task_info()
        info.update(task_changed=task_changed, unstable=True, unstable_reason=reason)
        return self._last_obs.copy(), 0.0, False, True, info



# ----------------------------------------------------------------------------------- scale tasks
class ScaleTaskMixin:
    """Tasks ``{scale_key: s}``: one positive scale, train range and disjoint test ranges.

    Subclasses set ``scale_key`` and implement ``_apply_scale(s)``; put this mixin before the env base.
    """

    scale_key = "scale"
    task_dim = 1

    def __init__(self, task_split: str = "train", change_every: int | None = None, *, train_range=(0.5, 1.5),
                 test_ranges=((0.25, 0.4), (1.75, 2.5)), **kwargs):
        self._init_scale_ranges(train_range, test_ranges)
        super().__init__(task_split, change_every, **kwargs)
        self._ezpickle(task_split=task_split, change_every=change_every, train_range=train_range,
                       test_ranges=test_ranges, **kwargs)

    def _init_scale_ranges(self, train_range, test_ranges) -> None:
        name = type(self).__name__
        self._train_ranges = check_ranges(f"{name} train_range", train_range, positive=True)
        self._test_ranges = check_ranges(f"{name} test_ranges", test_ranges, positive=True)
        if len(self._train_ranges) != 1:
            raise ValueError(f"{name}: train_range={train_range!r} is not allowed: give one (low, high) pair")
        if ranges_overlap(self._train_ranges, self._test_ranges):
            raise ValueError(f"{name}: train_range {fmt_ranges(self._train_ranges)} and test_ranges "
                             f"{fmt_ranges(self._test_ranges)} overlap: make them disjoint so test tasks stay unseen")

    def _split_ranges(self, split: str):
        return self._train_ranges if split == "train" else self._test_ranges

    def _sample_task(self, rng):
        return {self.scale_key: sample_ranges(rng, self._split_ranges(self.task_split))}

    def _normalize_task(self, task, split):
        name, key = type(self).__name__, self.scale_key
        if isinstance(task, dict):
            if set(task) != {key}:
                raise ValueError(f"{name}: task {task!r} is not allowed: expected a dict with the one key {key!r}, "
                                 f"e.g. {{{key!r}: 1.0}}")
            value = task[key]
        else:
            value = task
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: task {task!r} is not allowed: {key} must be a number, e.g. {{{key!r}: 1.0}}") from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: {key}={value} is not allowed: it must be a finite number > 0")
        if split is not None and not in_ranges(value, self._split_ranges(split)):
            other = "test" if split == "train" else "train"
            ranges = fmt_ranges(self._split_ranges(split))
            if in_ranges(value, self._split_ranges(other)):
                raise ValueError(f"{name}: {key}={value:g} is a {other} task but task_split={split!r} (its range: "
                                 f"{ranges}); create the env with task_split={other!r} for it, or pick a value in {ranges}")
            raise ValueError(f"{name}: {key}={value:g} is in neither split: pick a value in {ranges} for "
                             f"task_split={split!r} (other split: {fmt_ranges(self._split_ranges(other))})")
        return {key: value}

    def _encode_task(self, task):
        return np.array([task[self.scale_key]], dtype=np.float64)

    def _apply_task(self, task):
        self._apply_scale(task[self.scale_key])

    def _apply_scale(self, scale: float) -> None:
        raise NotImplementedError


SCALE_DOC = """Task ``{{"{key}": s}}``, task vector ``[s]``. Default split (disjoint): train U(0.5, 1.5);
    test U([0.25, 0.4] U [1.75, 2.5]) (extrapolation on both sides, a gap to the train range)."""


class MassScaleMixin(ScaleTaskMixin):
    """Every body's mass and inertia times ``mass_scale`` (the robot's bodies: ``self._robot_body_ids``)."""

    scale_key = "mass_scale"

    def _apply_scale(self, scale):
        ids = self._robot_body_ids
        if not hasattr(self, "_orig_mass"):
            self._orig_mass = self.model.body_mass[ids].copy()
            self._orig_inertia = self.model.body_inertia[ids].copy()
            self._const_scratch = mujoco.MjData(self.model)
        self.model.body_mass[ids] = self._orig_mass * scale
        self.model.body_inertia[ids] = self._orig_inertia * scale
        # derived constants (body_invweight0 etc., used by the constraint solver) follow the new masses;
        # computed on a scratch MjData so the simulation state is untouched
        mujoco.mj_setConst(self.model, self._const_scratch)


class FrictionScaleMixin(ScaleTaskMixin):
    """Every geom's friction coefficients (floor included) times ``friction_scale``; with MuJoCo's
    default max-mixing the friction of every contact is scaled by exactly that factor."""

    scale_key = "friction_scale"

    def _apply_scale(self, scale):
        if not hasattr(self, "_orig_friction"):
            self._orig_friction = self.model.geom_friction.copy()
        self.model.geom_friction[:] = self._orig_friction * scale
