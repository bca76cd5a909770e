"""Batched, differentiable torch reward and termination functions of the ``lit_meta`` envs.

A model-based controller scores imagined transitions ``(obs, action, next_obs)`` with these; on real
transitions they equal the envs' own reward / ``terminated`` (tested to 1e-5 in float64).

All functions take tensors with any leading batch dimensions (``obs[..., obs_dim]``,
``action[..., act_dim]``), return ``Tensor[...]`` in the promoted dtype of the inputs (float32 in,
float32 out), and are differentiable in ``obs``, ``action`` and ``next_obs``. Numpy arrays are accepted
and converted. The weights are keyword arguments; bind them with :func:`functools.partial` (the envs
expose such partials as ``env.unwrapped.reward_fn`` / ``termination_fn``, and
:func:`lit_meta.envs.reward_fn` builds them from an env id).

Actions are clipped to the action space, ``[action_low, action_high]`` (default ``[-1, 1]``, the
envs' action space), before the control cost, as the envs clip them before the physics and the cost:
so the reward of an out-of-range action equals the env's (its control-cost gradient is zero in the
clipped coordinates). ``action_low=None, action_high=None`` turns clipping off.

Observation layouts (``exclude_current_positions_from_observation=False`` in both):

* HalfCheetah (18): ``qpos[0:9]`` (x first), ``qvel[0:9]``.
* Ant (107): ``qpos[0:15]`` (x, y, z, quaternion, 8 joints), ``qvel[0:14]``, then the clipped external
  contact forces ``cfrc_ext[1:]`` (13 bodies x 6).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ANT_NQ, ANT_NV = 15, 14
Bound = float | Sequence[float] | None


def _tensors(*xs):
    out = [x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in xs]
    return out


def action_bounds(space) -> dict:
    """``{"action_low": ..., "action_high": ...}`` of a Box action space, as floats when every
    dimension shares them (the lit_meta envs: -1.0, 1.0), else as tuples; for ``functools.partial``."""
    out = {}
    for key, bound in (("action_low", space.low), ("action_high", space.high)):
        bound = np.asarray(bound, dtype=np.float64)
        out[key] = float(bound.flat[0]) if np.all(bound == bound.flat[0]) else tuple(bound.tolist())
    return out


def clip_action(action: torch.Tensor, low: Bound = -1.0, high: Bound = 1.0) -> torch.Tensor:
    """``action`` clipped to ``[low, high]`` (floats or per-dimension sequences; None: no bound)."""
    if low is None and high is None:
        return action
    if not all(b is None or isinstance(b, (int, float)) for b in (low, high)):  # per-dimension: tensors
        low, high = (None if b is None else torch.as_tensor(b, dtype=action.dtype, device=action.device)
                     for b in (low, high))
    return torch.clamp(action, min=low, max=high)


def half_cheetah_reward(obs, action, next_obs, *, dt: float = 0.05, forward_reward_weight: float = 1.0,
                        ctrl_cost_weight: float = 0.1, action_low: Bound = -1.0,
                        action_high: Bound = 1.0) -> torch.Tensor:
    """HalfCheetah v5: ``w_fwd * (x' - x) / dt - w_ctrl * |clip(a)|^2`` (x is ``obs[..., 0]``, ``a``
    clipped to ``[action_low, action_high]``)."""
    obs, action, next_obs = _tensors(obs, action, next_obs)
    action = clip_action(action, action_low, action_high)
    forward = forward_reward_weight * (next_obs[..., 0] - obs[..., 0]) / dt
    return forward - ctrl_cost_weight * action.square().sum(-1)


def half_cheetah_termination(obs, action, next_obs) -> torch.Tensor:
    """HalfCheetah never terminates: all False, shape ``next_obs.shape[:-1]``."""
    (next_obs,) = _tensors(next_obs)
    return torch.zeros(next_obs.shape[:-1], dtype=torch.bool, device=next_obs.device)


def ant_healthy(next_obs, *, healthy_z_range: tuple[float, float] = (0.2, 1.0)) -> torch.Tensor:
    """Ant v5 ``is_healthy``: qpos/qvel finite and the torso height ``z`` within ``healthy_z_range``."""
    (next_obs,) = _tensors(next_obs)
    state = next_obs[..., : ANT_NQ + ANT_NV]
    z = next_obs[..., 2]
    low, high = healthy_z_range
    return torch.isfinite(state).all(-1) & (z >= low) & (z <= high)


def ant_reward(obs, action, next_obs, *, dt: float = 0.05, forward_reward_weight: float = 1.0,
               ctrl_cost_weight: float = 0.5, contact_cost_weight: float = 5e-4, healthy_reward: float = 1.0,
               healthy_z_range: tuple[float, float] = (0.2, 1.0), action_low: Bound = -1.0,
               action_high: Bound = 1.0) -> torch.Tensor:
    """Ant v5: ``w_fwd * dx/dt + healthy_reward * healthy - w_ctrl |clip(a)|^2 - w_contact |clip(cfrc_ext)|^2``.

    ``dx`` is the torso (main body) x displacement, ``obs[..., 0]``; ``a`` is clipped to
    ``[action_low, action_high]``; the contact forces are the already-clipped ones in
    ``next_obs[..., 29:]`` (the world body's entry, excluded from the observation, is always zero).
    """
    obs, action, next_obs = _tensors(obs, action, next_obs)
    action = clip_action(action, action_low, action_high)
    forward = forward_reward_weight * (next_obs[..., 0] - obs[..., 0]) / dt
    healthy = ant_healthy(next_obs, healthy_z_range=healthy_z_range).to(forward.dtype)
    ctrl = ctrl_cost_weight * action.square().sum(-1)
    contact = contact_cost_weight * next_obs[..., ANT_NQ + ANT_NV:].square().sum(-1)
    return forward + healthy_reward * healthy - ctrl - contact


def ant_termination(obs, action, next_obs, *, healthy_z_range: tuple[float, float] = (0.2, 1.0),
                    terminate_when_unhealthy: bool = True) -> torch.Tensor:
    """Ant v5: terminated when unhealthy (if ``terminate_when_unhealthy``)."""
    (next_obs,) = _tensors(next_obs)
    unhealthy = ~ant_healthy(next_obs, healthy_z_range=healthy_z_range)
    return unhealthy if terminate_when_unhealthy else torch.zeros_like(unhealthy)
