"""What every ``lit_meta`` env shares: the task API, mid-episode task switches, composed
perturbations, action clipping and the instability guard.

:class:`TaskEnvMixin` sits before a gymnasium v5 MuJoCo class in the MRO and adds

* ``task_split`` ("train" | "test") and ``change_every`` (resample a task of the split every n steps),
* ``reset(options={"task": ...})`` (``options`` must be None or a dict whose only key is "task"),
  ``get_task()``, ``set_task(task)`` (switch now, mid-episode, keeping the physics state), the
  ``task`` property (get / set), ``task_vector()``, ``task_dim``; :func:`set_task` / :func:`get_task`
  do the same through ``gym.make`` wrappers and on gymnasium vector envs,
* ``compose=("mass_scale", "friction_scale")`` (constructor): every task also carries these scales,
  applied on top of the env's own perturbation (see :func:`check_compose`),
* ``info["task"]`` (the task of this transition), ``info["task_vector"]``, ``info["task_changed"]``
  (True on the first step whose task differs from the previous step's, or from the reset's: after a
  ``change_every`` draw or a ``set_task`` that changed the task; once, then False again),
  ``info["action_clipped"]``, ``info["unstable"]``, ``info["unstable_reason"]`` ("" when stable) on
  every step; the task keys on reset. Task values keep one type per key (e.g. intact = "none" / -1,
  not None) so that vector-env infos stack,
* action clipping: an action outside the action space (``[-1, 1]`` per actuator) is clipped to it
  before the physics *and* the control cost (MuJoCo would clamp the control anyway, while v5 charges
  the cost on the commanded value); ``info["action_clipped"]`` says so. ``reward_fn`` clips alike,
* the guard: a non-finite action, a MuJoCo instability warning (bad qpos/qvel/qacc/ctrl) or a
  non-finite state/observation/reward ends the episode with ``truncated=True``, reward 0, the last
  finite observation and ``info["unstable"] = True``, logged once on the ``lit_meta.envs`` logger.

Subclasses implement ``_sample_task``, ``_normalize_task``, ``_apply_task`` and ``_encode_task`` for
their own perturbation; the composed scales are handled here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import gymnasium as gym
import mujoco
import numpy as np

logger = logging.getLogger("lit_meta.envs")

SPLITS = ("train", "test")
RESET_OPTIONS = ("task",)  # the keys reset(options=...) accepts
COMPOSABLE = ("mass_scale", "friction_scale")  # perturbations any HalfCheetah / Ant task can carry on top
DEFAULT_SCALE_TRAIN = (0.5, 1.5)
DEFAULT_SCALE_TEST = ((0.25, 0.4), (1.75, 2.5))
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


def check_scale(name: str, key: str, value, task, ranges: Mapping[str, tuple], split: str | None, *,
                note: str = "") -> float:
    """Validate one scale (a finite number > 0) of ``task`` for ``split`` (None: either split; else it
    must lie in ``ranges[split]``) and return it as a float; ``note`` follows the value in messages."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: task {task!r} is not allowed: {key} must be a number, e.g. {{{key!r}: 1.0}}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: {key}={value}{note} is not allowed: it must be a finite number > 0")
    if split is not None and not in_ranges(value, ranges[split]):
        other = "test" if split == "train" else "train"
        here = fmt_ranges(ranges[split])
        if in_ranges(value, ranges[other]):
            raise ValueError(f"{name}: {key}={value:g}{note} is a {other} task but task_split={split!r} (its range: "
                             f"{here}); create the env with task_split={other!r} for it, or pick a value in {here}")
        raise ValueError(f"{name}: {key}={value:g}{note} is in neither split: pick a value in {here} for "
                         f"task_split={split!r} (other split: {fmt_ranges(ranges[other])})")
    return value


def check_compose(name: str, compose, main_key: str | None = None) -> dict[str, dict[str, tuple]]:
    """Normalise the ``compose`` constructor argument into ``{key: {"train": ranges, "test": ranges}}``.

    ``compose``: None or ``()`` (the default: no composition, tasks and task vectors as without it);
    one key or a sequence of keys of :data:`COMPOSABLE` with the default ranges (train U(0.5, 1.5), test
    U([0.25, 0.4] U [1.75, 2.5]), as the Mass / Friction envs); or a mapping ``{key: None | {"train_range":
    (low, high), "test_ranges": (low, high) or ((low, high), ...)}}``. The keys may not repeat the env's own
    task key (``main_key``). Unlike a main perturbation's, these ranges may overlap (e.g. the test split
    may reuse the train masses): the main perturbation keeps the splits apart.
    """
    if compose is None:
        return {}
    if isinstance(compose, str):
        compose = (compose,)
    if isinstance(compose, Mapping):
        items = list(compose.items())
    elif isinstance(compose, Sequence):
        items = [(key, None) for key in compose]
    else:
        raise ValueError(f"{name}: compose={compose!r} is not allowed: give a tuple of keys of {COMPOSABLE}, e.g. "
                         f"compose=('mass_scale',), or a dict {{key: {{'train_range': ..., 'test_ranges': ...}}}}")
    out: dict[str, dict[str, tuple]] = {}
    for key, spec in items:
        if key not in COMPOSABLE:
            raise ValueError(f"{name}: compose key {key!r} is not allowed: use keys of {COMPOSABLE}, e.g. "
                             f"compose=('mass_scale',)")
        if key == main_key:
            others = tuple(k for k in COMPOSABLE if k != key)
            raise ValueError(f"{name}: compose key {key!r} is not allowed: it is this env's own task key; compose "
                             f"adds other perturbations on top, e.g. compose={others!r}")
        if key in out:
            raise ValueError(f"{name}: compose key {key!r} appears twice in compose={compose!r}: give each key once")
        spec = {} if spec is None else spec
        if not isinstance(spec, Mapping) or set(spec) - {"train_range", "test_ranges"}:
            raise ValueError(f"{name}: compose[{key!r}]={spec!r} is not allowed: give None (default ranges) or a dict "
                             f"with 'train_range': (low, high) and/or 'test_ranges': (low, high) or ((low, high), ...)")
        train = check_ranges(f"{name} compose[{key!r}]['train_range']", spec.get("train_range", DEFAULT_SCALE_TRAIN),
                             positive=True)
        if len(train) != 1:
            raise ValueError(f"{name}: compose[{key!r}]['train_range']={spec['train_range']!r} is not allowed: give "
                             f"one (low, high) pair")
        test = check_ranges(f"{name} compose[{key!r}]['test_ranges']", spec.get("test_ranges", DEFAULT_SCALE_TEST),
                            positive=True)
        out[key] = {"train": train, "test": test}
    return out


def apply_mass_scale(env, scale: float) -> None:
    """Every robot body's (``env._robot_body_ids``) mass and inertia = the unperturbed one x ``scale``."""
    ids = env._robot_body_ids
    if not hasattr(env, "_orig_mass"):
        env._orig_mass = env.model.body_mass[ids].copy()
        env._orig_inertia = env.model.body_inertia[ids].copy()
        env._const_scratch = mujoco.MjData(env.model)
    env.model.body_mass[ids] = env._orig_mass * scale
    env.model.body_inertia[ids] = env._orig_inertia * scale
    # derived constants (body_invweight0 etc., used by the constraint solver) follow the new masses;
    # computed on a scratch MjData so the simulation state is untouched
    mujoco.mj_setConst(env.model, env._const_scratch)


def apply_friction_scale(env, scale: float) -> None:
    """Every geom's friction coefficients (floor included) = the unperturbed ones x ``scale``; with
    MuJoCo's default max-mixing the friction of every contact is scaled by exactly that factor."""
    if not hasattr(env, "_orig_friction"):
        env._orig_friction = env.model.geom_friction.copy()
    env.model.geom_friction[:] = env._orig_friction * scale


_APPLY_SCALE = {"mass_scale": apply_mass_scale, "friction_scale": apply_friction_scale}


# ----------------------------------------------------------------------------------- the mixin
class TaskEnvMixin:
    """Task API + action clipping + instability guard for a gymnasium ``MujocoEnv`` subclass (put it
    first in the bases).

    Switching tasks from user code: ``env.unwrapped.set_task(task)`` (or ``env.unwrapped.task = task``,
    or :func:`lit_meta.envs.set_task` through wrappers and on vector envs) validates ``task`` for this
    env's split, then changes the MuJoCo model at once, keeping the physics state (qpos, qvel): the next
    ``step`` runs under the new task and reports ``info["task_changed"] = True`` if the task differs from
    the previous step's. A later ``reset()`` draws a new task (or takes ``options={"task": ...}``), and a
    ``change_every`` draw replaces a manually set task on its schedule (which a manual switch leaves as is).
    """

    task_dim: int = 0

    def _init_task_api(self, task_split: str, change_every: int | None, compose=None) -> None:
        self.task_split = check_split(task_split)
        self.change_every = check_change_every(change_every)
        ranges = check_compose(type(self).__name__, compose, getattr(self, "scale_key", None))
        self.compose: tuple[str, ...] = tuple(ranges)  # the extra (composed) task keys, in task-vector order
        self.compose_ranges: dict[str, dict[str, tuple]] = ranges  # key -> {"train": ranges, "test": ranges}
        self.task_dim = self.task_dim + len(self.compose)  # instance attribute: constant for this env
        self._task: dict | None = None
        self._prev_task: dict | None = None  # the task of the previous transition (or of the reset)
        self._requested_task: dict | None = None
        self._steps = 0
        self._needs_reset = False
        self._last_obs: np.ndarray | None = None

    # -- to implement -------------------------------------------------------------------------------
    def _sample_task(self, rng: np.random.Generator) -> dict:
        """A task of ``self.task_split`` (the env's own perturbation; the composed keys are added here)."""
        raise NotImplementedError

    def _normalize_task(self, task, split: str | None) -> dict:
        """Validate ``task`` (for ``split``; None = either split) and return its canonical dict (the env's
        own keys only: the composed keys are taken out before and checked here)."""
        raise NotImplementedError

    def _apply_task(self, task: dict) -> None:
        """Change the MuJoCo model for ``task`` (starting from the unperturbed model)."""
        raise NotImplementedError

    def _encode_task(self, task: dict) -> np.ndarray:
        """The env's own part of the task vector."""
        raise NotImplementedError

    # -- composition ----------------------------------------------------------------------------------
    def _canonical_task(self, task, split: str | None) -> dict:
        """Validate ``task`` (for ``split``; None = either split): its own part by ``_normalize_task``,
        then the composed scales (1.0 where the task omits one). Raises ValueError, changes nothing."""
        name = type(self).__name__
        extra = {}
        if isinstance(task, Mapping):
            stray = [k for k in task if k in COMPOSABLE and k not in self.compose and k != getattr(self, "scale_key", None)]
            if stray:
                raise ValueError(f"{name}: task {dict(task)!r} is not allowed: {stray[0]!r} is a composed perturbation "
                                 f"and this env was created with compose={self.compose!r}; create it with "
                                 f"compose={self.compose + (stray[0],)!r} (adds an entry per key to the task vector), "
                                 f"or drop the key")
            extra = {k: task[k] for k in self.compose if k in task}
            task = {k: v for k, v in task.items() if k not in self.compose}
        out = self._normalize_task(task, split)
        for key in self.compose:
            note = "" if key in extra else " (the value of a task that omits it)"
            out[key] = check_scale(name, key, extra.get(key, 1.0), task, self.compose_ranges[key], split, note=note)
        return out

    def _draw_task(self, rng: np.random.Generator) -> dict:
        task = self._sample_task(rng)
        for key in self.compose:  # drawn after the env's own part: without compose the draws are unchanged
            task[key] = sample_ranges(rng, self.compose_ranges[key][self.task_split])
        return task

    def _full_vector(self, task: dict) -> np.ndarray:
        vec = np.asarray(self._encode_task(task), dtype=np.float64)
        if self.compose:
            vec = np.concatenate([vec, [task[k] for k in self.compose]])
        return vec

    # -- public API -----------------------------------------------------------------------------------
    def get_task(self) -> dict | None:
        """The current task as a plain (JSON-able) dict (a copy); ``None`` before the first reset."""
        return None if self._task is None else _copy_task(self._task)

    def task_vector(self, task: dict | None = None) -> np.ndarray:
        """Numeric encoding ``float64[task_dim]`` of ``task`` (default: the current one): the env's own
        encoding, then one entry per ``compose`` key (the scale)."""
        if task is None:
            if self._task is None:
                raise ValueError(f"{type(self).__name__}.task_vector(): no current task before reset(); "
                                 f"call reset() first or pass a task")
            return self._task_vector.copy()
        return self._full_vector(self._canonical_task(task, None)).copy()

    def set_task(self, task) -> None:
        """Switch to ``task`` now, mid-episode, keeping the physics state (qpos, qvel).

        ``task``: a task dict of this env's split (as for ``reset(options={"task": task})``; with
        ``compose``, scales it omits are 1.0). The MuJoCo model changes at once; the next ``step`` runs
        under ``task`` and, if it differs from the previous step's task, reports
        ``info["task_changed"] = True`` (once). Raises ValueError for a bad task or one of the other
        split, RuntimeError before the first ``reset()``, in both cases before any change. Through
        ``gym.make`` wrappers or on a vector env use :func:`lit_meta.envs.set_task`.
        """
        if self._task is None:
            raise RuntimeError(f"{type(self).__name__}.set_task() before reset(): call reset() first, or pass the "
                               f"task to reset(options={{'task': ...}})")
        self._set_task(self._canonical_task(task, self.task_split))

    @property
    def task(self) -> dict | None:
        """The current task (``get_task()``); assigning to it calls ``set_task`` (so a vector env's
        ``set_attr("task", tasks)`` switches each sub-env; :func:`lit_meta.envs.set_task` checks first)."""
        return self.get_task()

    @task.setter
    def task(self, task) -> None:
        self.set_task(task)

    def task_errors(self, tasks: Sequence) -> list[str]:
        """For each of ``tasks``: ``""`` if ``set_task`` would accept it now, else its error message.
        Never raises (an exception would end an ``AsyncVectorEnv`` worker): :func:`set_task` checks a
        vector env's tasks with it before any sub-env changes."""
        out = []
        for task in tasks:
            try:
                if self._task is None:
                    raise RuntimeError(f"{type(self).__name__}: set_task() before reset(): call reset() first")
                self._canonical_task(task, self.task_split)
                out.append("")
            except Exception as exc:  # noqa: BLE001 -- reported to the caller, who raises
                out.append(str(exc) or type(exc).__name__)
        return out

    def _set_task(self, task: dict) -> None:
        self._apply_task(task)
        for key in self.compose:  # on top of the env's own perturbation (which leaves these arrays alone)
            _APPLY_SCALE[key](self, task[key])
        self._task = task
        self._task_vector = self._full_vector(task)

    def _task_info(self) -> dict:
        return {"task": _copy_task(self._task), "task_vector": self._task_vector.copy()}

    def _take_task_changed(self) -> bool:
        """Whether this transition's task differs from the previous one's (or the reset's); marks it seen."""
        changed = self._task is not self._prev_task and self._task != self._prev_task
        self._prev_task = self._task
        return changed

    # -- gymnasium API --------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset the physics; the task is ``options["task"]`` (of this env's split) or a random one of the split.

        ``options``: None or a dict whose only key is ``"task"`` (anything else raises ValueError before
        any change)."""
        name = type(self).__name__
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(f"{name}.reset(): options={options!r} is not allowed: options must be a dict like "
                             f"{{'task': {{...}}}} (e.g. reset(options={{'task': <task dict>}})), or None for a random "
                             f"task of the split")
        unknown = [k for k in (options or {}) if k not in RESET_OPTIONS]
        if unknown:
            raise ValueError(f"{name}.reset(): unknown key {unknown[0]!r} in options={dict(options)!r}: the allowed keys "
                             f"are {RESET_OPTIONS} (e.g. options={{'task': ...}})")
        task = (options or {}).get("task")
        # validate before touching the simulation, so a bad task leaves the env as it was
        self._requested_task = None if task is None else self._canonical_task(task, self.task_split)
        obs, info = super().reset(seed=seed, options=options)
        self._requested_task = None
        self._steps = 0
        self._needs_reset = False
        self._prev_task = self._task
        self._last_obs = obs.copy()
        self._counts = self._warning_counts()
        info.update(self._task_info())
        return obs, info

    def reset_model(self):
        # called by MujocoEnv.reset after seeding and mj_resetData: set the task, then the initial state
        task = self._requested_task if self._requested_task is not None else self._draw_task(self.np_random)
        self._set_task(task)
        return super().reset_model()

    def step(self, action):
        """One env step. ``action``: shape ``action_space.shape``; values outside the action space are
        clipped to it (physics and control cost alike; ``info["action_clipped"]`` is True then);
        a non-finite action ends the episode (see the module doc)."""
        if self._task is None or self._last_obs is None:
            raise RuntimeError(f"{type(self).__name__}.step() before reset(): call reset() first")
        if self._needs_reset:
            return self._unstable_step("step() after an unstable step without reset(); call reset()", log=False)
        action = np.asarray(action)
        if action.shape != self.action_space.shape:
            shape = self.action_space.shape
            raise ValueError(
                f"{type(self).__name__}.step(): got an action of shape {action.shape}, expected {shape} (one value "
                f"per actuator). A gymnasium vector env (gym.make_vec) needs actions of shape [num_envs, "
                f"*action_shape] = (num_envs, {', '.join(map(str, shape))}): one row per sub-env, e.g. "
                f"vec_env.action_space.sample()")
        if not np.all(np.isfinite(action)):
            return self._unstable_step(f"non-finite action {np.array2string(action, precision=3)}",
                                       task_changed=self._take_task_changed())
        low, high = self.action_space.low, self.action_space.high
        action_clipped = bool((action < low).any() or (action > high).any())
        if action_clipped:
            action = np.clip(action, low, high)
        if self.change_every is not None and self._steps > 0 and self._steps % self.change_every == 0:
            self._set_task(self._draw_task(self.np_random))
        task_changed = self._take_task_changed()
        obs, reward, terminated, truncated, info = super().step(action)
        self._steps += 1
        reason = self._instability(obs, reward)
        if reason is not None:
            return self._unstable_step(reason, task_changed=task_changed, action_clipped=action_clipped)
        self._last_obs = obs.copy()
        info.update(self._task_info(), task_changed=task_changed, action_clipped=action_clipped, unstable=False,
                    unstable_reason="")
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

    def _unstable_step(self, reason: str, *, task_changed: bool = False, action_clipped: bool = False,
                       log: bool = True):
        self._needs_reset = True
        if log:
            logger.warning("%s: unstable at step %d: %s -> episode truncated (reward 0, last finite observation, "
                           "info['unstable']=True); call reset()", type(self).__name__, self._steps, reason)
        info = self._task_info()
        info.update(task_changed=task_changed, action_clipped=action_clipped, unstable=True, unstable_reason=reason)
        return self._last_obs.copy(), 0.0, False, True, info



# ----------------------------------------------------------------------------------- scale tasks
class ScaleTaskMixin:
    """Tasks ``{scale_key: s}``: one positive scale, train range and disjoint test ranges.

    Subclasses set ``scale_key`` and implement ``_apply_scale(s)``; put this mixin before the env base.
    """

    scale_key = "scale"
    task_dim = 1

    def __init__(self, task_split: str = "train", change_every: int | None = None, *, train_range=DEFAULT_SCALE_TRAIN,
                 test_ranges=DEFAULT_SCALE_TEST, **kwargs):
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
        if isinstance(task, Mapping):
            if set(task) != {key}:
                raise ValueError(f"{name}: task {task!r} is not allowed: expected a dict with the one key {key!r}, "
                                 f"e.g. {{{key!r}: 1.0}}")
            value = task[key]
        else:
            value = task
        ranges = {"train": self._train_ranges, "test": self._test_ranges}
        return {key: check_scale(name, key, value, task, ranges, split)}

    def _encode_task(self, task):
        return np.array([task[self.scale_key]], dtype=np.float64)

    def _apply_task(self, task):
        self._apply_scale(task[self.scale_key])

    def _apply_scale(self, scale: float) -> None:
        raise NotImplementedError


SCALE_DOC = """Task ``{{"{key}": s}}``, task vector ``[s]``. Default split (disjoint): train U(0.5, 1.5);
    test U([0.25, 0.4] U [1.75, 2.5]) (extrapolation on both sides, a gap to the train range).
    ``compose`` may add the other scale key to every task (and to the task vector, after ``s``)."""


class MassScaleMixin(ScaleTaskMixin):
    """Every body's mass and inertia times ``mass_scale`` (the robot's bodies: ``self._robot_body_ids``)."""

    scale_key = "mass_scale"

    def _apply_scale(self, scale):
        apply_mass_scale(self, scale)


class FrictionScaleMixin(ScaleTaskMixin):
    """Every geom's friction coefficients (floor included) times ``friction_scale``; with MuJoCo's
    default max-mixing the friction of every contact is scaled by exactly that factor."""

    scale_key = "friction_scale"

    def _apply_scale(self, scale):
        apply_friction_scale(self, scale)


# ----------------------------------------------------------------------------------- through wrappers, vector envs
def _is_vector(env) -> bool:
    return isinstance(env, gym.vector.VectorEnv)


def _check_task_env(env, what: str) -> None:
    """Raise TypeError unless ``env`` (a gymnasium env or vector env) wraps lit_meta task envs."""
    if _is_vector(env):
        ok = all(env.call("has_wrapper_attr", "task_errors"))  # never raises, so async workers survive
    elif isinstance(env, gym.Env):
        ok = env.has_wrapper_attr("task_errors")
    else:
        raise TypeError(f"{what}: env={env!r} is not allowed: give a gymnasium env (gym.make) or vector env "
                        f"(gym.make_vec) of a lit_meta task env")
    if not ok:
        raise TypeError(f"{what}: {env} has no lit_meta task API: use an env made from a lit_meta id, e.g. "
                        f"gym.make('lit_meta/HalfCheetahCrippledJoint-v0') or gym.make_vec(...) of one")


def _same(a, b) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # noqa: BLE001 -- e.g. numpy arrays inside: treat as distinct (each is checked)
        return False


def set_task(env, task_or_tasks) -> None:
    """Switch the task of ``env`` now, mid-episode, keeping the physics state (see ``TaskEnvMixin.set_task``).

    ``env``: a lit_meta env, bare or wrapped (``gym.make``), or a gymnasium vector env of them
    (``gym.make_vec``, sync or async; vector wrappers too). ``task_or_tasks``: one task dict for a
    single env; for a vector env one task dict for every sub-env, or a list/tuple of ``num_envs`` task
    dicts, one per sub-env. Every task is checked for its sub-env's split first (through the vector
    env's ``call``), so a bad task raises ValueError (naming the sub-envs and the reason) before any
    sub-env changes; then the sub-envs switch (``set_attr("task", tasks)``). The next step of each
    switched sub-env whose task differs reports ``info["task_changed"] = True``. Raises TypeError for
    an env without the lit_meta task API, RuntimeError / ValueError before the first reset.
    """
    _check_task_env(env, "set_task")
    if not _is_vector(env):
        if isinstance(task_or_tasks, (list, tuple)) and task_or_tasks and all(isinstance(t, Mapping) for t in task_or_tasks):
            raise ValueError(f"set_task: a list of {len(task_or_tasks)} tasks is for a vector env (one per sub-env); "
                             f"give a single env one task dict")
        env.get_wrapper_attr("set_task")(task_or_tasks)
        return
    n = env.num_envs
    if isinstance(task_or_tasks, (list, tuple)):
        tasks = list(task_or_tasks)
        if len(tasks) != n:
            raise ValueError(f"set_task: got {len(tasks)} tasks for a vector env of {n} sub-envs: give one task "
                             f"(for all) or a list of {n} (one per sub-env)")
    else:
        tasks = [task_or_tasks] * n
    unique, which = [], []  # each sub-env checks the distinct tasks (usually one) in one round trip
    for task in tasks:
        k = next((k for k, u in enumerate(unique) if _same(u, task)), None)
        if k is None:
            unique.append(task)
            k = len(unique) - 1
        which.append(k)
    verdicts = env.call("task_errors", unique)
    errors: dict[str, list[int]] = {}
    for i, (verdict, k) in enumerate(zip(verdicts, which)):
        if verdict[k]:
            errors.setdefault(verdict[k], []).append(i)
    if errors:
        lines = "; ".join(f"sub-env{'s' if len(ids) > 1 else ''} {ids if len(ids) > 1 else ids[0]}: {msg}"
                          for msg, ids in errors.items())
        raise ValueError(f"set_task on a vector env of {n} sub-envs: nothing changed, {lines}")
    env.set_attr("task", tasks)


def get_task(env) -> dict | list[dict] | None:
    """The current task of ``env``: a dict (None before the first reset) for a single env, bare or wrapped
    (``gym.make``); a list of ``num_envs`` dicts for a vector env (``gym.make_vec``)."""
    _check_task_env(env, "get_task")
    if _is_vector(env):
        return list(env.call("get_task"))
    return env.get_wrapper_attr("get_task")()
