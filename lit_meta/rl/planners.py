"""Sampling-based MPC planners over a learned dynamics model: random shooting, CEM and MPPI.

Pure functions (no global state, no modules): each call plans one control step for ``E`` environments
at once and returns a :class:`PlanResult`. Everything is one tensor program on the device of ``obs``
(CPU or GPU): for every horizon step, the candidates of ALL environments go through the model in ONE
call, so the dynamics is called exactly ``horizon`` times per iteration.

The callables (all batched over a leading dimension ``B = E * n_candidates``)::

    dynamics(obs: Tensor[B, obs_dim], action: Tensor[B, act_dim]) -> next_obs: Tensor[B, obs_dim]
    reward_fn(obs, action, next_obs) -> Tensor[B]                 # e.g. env.unwrapped.reward_fn
    termination_fn(obs, action, next_obs) -> BoolTensor[B]        # optional, env.unwrapped.termination_fn

Row layout of the batch the dynamics sees: environment-major, ``row = e * n_candidates + k`` (rows
``e * n_candidates : (e + 1) * n_candidates`` are environment ``e``'s candidates), so a model with
per-environment adapted parameters (GrBAL) can ``view(E, n_candidates, -1)`` its input.

Scoring: a candidate's return is the undiscounted sum of its rewards over the horizon; with
``termination_fn``, the reward of the step that terminates counts and later rewards count 0. A
candidate whose predicted ``next_obs`` or reward is NaN/inf at a step where it is still alive gets
return ``-inf``: it is never chosen (nor used as a CEM elite or given MPPI weight) and is counted in
``PlanResult.n_nonfinite``. If every candidate of an environment is non-finite, that environment gets
the safe action (zeros clipped to the bounds) and ``PlanResult.fallback`` is True: never NaN.

Randomness: noise comes from ``generator`` (``torch.Generator``; the global RNG if None), drawn on the
generator's device and moved to ``obs``'s device, environment by environment and up front for all
iterations. On CPU, planning E environments at once therefore gives exactly the same result as planning
them one at a time with the same generator (the noise streams are the same).

MPC use (warm start, as in PETS / Nagabandi et al.)::

    res = cem(dynamics, reward_fn, obs, action_low=low, action_high=high, init_mean=warm, generator=g)
    env.step(res.action)
    warm = shift_plan(res.plan, low, high)          # next step's init_mean
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Callable, NamedTuple, Sequence, Union

import torch
from torch import Tensor

__all__ = ["PlanResult", "candidate_returns", "random_shooting", "cem", "mppi", "shift_plan", "action_bounds", "torchrl_model_env",
           "torchrl_return_to_go"]

Dynamics = Callable[[Tensor, Tensor], Tensor]
RewardFn = Callable[[Tensor, Tensor, Tensor], Tensor]
Bound = Union[float, Sequence[float], Tensor]


class PlanResult(NamedTuple):
    """What a planner returns (``E`` environments; unbatched ``obs[obs_dim]`` drops the ``E`` dim).

    action: ``[E, act_dim]`` the first action of the chosen plan (within the bounds, always finite).
    plan: ``[E, horizon, act_dim]`` the chosen action sequence; warm-start the next step with
        :func:`shift_plan` of it.
    expected_return: ``[E]`` the model's return of the plan (random shooting / CEM best: the return of
        that candidate; CEM ``return_mean_elites``: mean return of the last elites; MPPI: the
        softmax-weighted mean of the last iteration's candidate returns). ``-inf`` where ``fallback``.
    n_nonfinite: ``[E]`` int64, candidates discarded for NaN/inf, summed over iterations.
    fallback: ``[E]`` bool, True where every candidate was non-finite and the safe action was returned.
    """

    action: Tensor
    plan: Tensor
    expected_return: Tensor
    n_nonfinite: Tensor
    fallback: Tensor


# ----------------------------------------------------------------------------------------------------
# argument checks (all raised before any work)


def _check_int(name: str, value, low: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}={value!r}: must be an int >= {low}; {fix}")
    return int(value)


def _check_positive(name: str, value, fix: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r}: must be a finite number > 0; {fix}")
    return float(value)


def _check_sizes(horizon, n_candidates) -> None:
    """Every planner's ``horizon`` and ``n_candidates`` (also checked by ``MPCController`` when it is built)."""
    _check_int("horizon", horizon, 1, "plan at least one step ahead (paper: horizon=10)")
    _check_int("n_candidates", n_candidates, 1, "sample at least one candidate (paper: n_candidates=500)")


def _check_cem_settings(n_candidates, iterations, n_elites, alpha) -> None:
    """:func:`cem`'s scalar settings (also checked by ``MPCController`` when it is built)."""
    _check_int("iterations", iterations, 1, "run at least one CEM iteration (PETS: 5)")
    _check_int("n_elites", n_elites, 1, "keep at least one elite (PETS: 50)")
    if n_elites > n_candidates:
        raise ValueError(f"n_elites={n_elites} > n_candidates={n_candidates}: the elites are a subset of the "
                         f"candidates; use n_elites <= {n_candidates} (e.g. n_candidates // 10)")
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not 0 <= alpha < 1:
        raise ValueError(f"alpha={alpha!r}: the smoothing weight of the old mean must be in [0, 1) (PETS: 0.1)")


def _check_mppi_settings(temperature, iterations) -> None:
    """:func:`mppi`'s scalar settings (also checked by ``MPCController`` when it is built)."""
    _check_positive("temperature", temperature, "it is lambda of exp(R / lambda), in return units (e.g. 1.0)")
    _check_int("iterations", iterations, 1, "run at least one MPPI update (Williams et al.: 1)")


def action_bounds(action_low: Bound, action_high: Bound, *, act_dim: int | None = None,
                  dtype: torch.dtype = torch.float32, device=None) -> tuple[Tensor, Tensor]:
    """``(low, high)`` as ``Tensor[act_dim]`` on ``device``, validated (finite, same size, low <= high).

    Accepts floats, sequences, numpy arrays (e.g. ``env.action_space.low``) or tensors; scalars are
    broadcast to ``act_dim`` (which must then be given). Raises ValueError naming the bad value and the fix.
    """
    try:
        low = torch.as_tensor(action_low, dtype=torch.float64).detach().cpu()
        high = torch.as_tensor(action_high, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"action bounds must be numbers, sequences or tensors, got action_low={action_low!r}, "
                         f"action_high={action_high!r}: pass env.action_space.low / .high") from err
    if low.ndim > 1 or high.ndim > 1:
        raise ValueError(f"action bounds must be scalars or 1-D [act_dim], got shapes {tuple(low.shape)} and "
                         f"{tuple(high.shape)}: pass env.single_action_space.low / .high for a vector env")
    sizes = {int(t.numel()) for t in (low, high) if t.ndim == 1}
    if act_dim is not None:
        sizes.add(int(act_dim))
    if len(sizes) > 1:
        raise ValueError(f"action bounds / act_dim disagree on the action size: action_low {tuple(low.shape)}, "
                         f"action_high {tuple(high.shape)}, act_dim={act_dim}: give both bounds with act_dim entries")
    if not sizes:
        raise ValueError(f"scalar action bounds ({float(low)}, {float(high)}) do not say the action size: "
                         "pass act_dim=... or 1-D bounds such as env.action_space.low")
    (n,) = sizes
    if n < 1:
        raise ValueError("action bounds are empty (act_dim 0): the planner needs at least one action dimension")
    low, high = low.expand(n), high.expand(n)
    if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise ValueError(f"action bounds must be finite, got low={low.tolist()}, high={high.tolist()}: "
                         "clip an unbounded action space to the range the robot can actually use")
    if (low > high).any():
        bad = (low > high).nonzero().flatten().tolist()
        raise ValueError(f"action_low > action_high at dims {bad} (low={low.tolist()}, high={high.tolist()}): "
                         "swap them or fix the env's action space")
    return low.to(dtype=dtype, device=device), high.to(dtype=dtype, device=device)


def _check_common(dynamics, reward_fn, termination_fn, obs, horizon, n_candidates, action_low, action_high,
                  act_dim, generator):
    if not callable(dynamics):
        raise ValueError(f"dynamics must be a callable dynamics(obs[B, obs_dim], action[B, act_dim]) -> "
                         f"next_obs[B, obs_dim], got {type(dynamics).__name__}")
    if reward_fn is None or not callable(reward_fn):
        raise ValueError(f"reward_fn must be a callable reward_fn(obs, action, next_obs) -> Tensor[B], got "
                         f"{reward_fn!r}: pass env.unwrapped.reward_fn (or lit_meta.envs.reward_fn(env_id))")
    if termination_fn is not None and not callable(termination_fn):
        raise ValueError(f"termination_fn must be None or a callable returning BoolTensor[B], got {termination_fn!r}")
    _check_sizes(horizon, n_candidates)
    if not isinstance(obs, Tensor):
        raise ValueError(f"obs must be a torch.Tensor [E, obs_dim] (or [obs_dim]), got {type(obs).__name__}: "
                         "wrap it with torch.as_tensor(obs, dtype=torch.float32)")
    if obs.ndim not in (1, 2) or obs.shape[-1] < 1 or (obs.ndim == 2 and obs.shape[0] < 1):
        raise ValueError(f"obs must be [E, obs_dim] (E environments) or [obs_dim], got shape {tuple(obs.shape)}")
    if not obs.is_floating_point():
        raise ValueError(f"obs must be a floating tensor, got {obs.dtype}: convert with obs.float()")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    low, high = action_bounds(action_low, action_high, act_dim=act_dim, dtype=obs.dtype, device=obs.device)
    unbatched = obs.ndim == 1
    return (obs.unsqueeze(0) if unbatched else obs), unbatched, low, high


def _as_plan(name: str, value, E: int, horizon: int, act_dim: int, like: Tensor, fix: str) -> Tensor:
    """A ``[E, horizon, act_dim]`` tensor from a scalar, ``[act_dim]``, ``[horizon, act_dim]`` or full value."""
    t = torch.as_tensor(value, dtype=like.dtype).to(like.device)
    try:
        t = t.expand(E, horizon, act_dim) if t.ndim <= 3 else None
    except RuntimeError:
        t = None
    if t is None:
        raise ValueError(f"{name} has shape {tuple(torch.as_tensor(value).shape)}, which does not broadcast to "
                         f"[E={E}, horizon={horizon}, act_dim={act_dim}]; {fix}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN/inf; {fix}")
    return t


# ----------------------------------------------------------------------------------------------------
# the shared core: noise and the batched rollout of all candidates


def _gaussian(init_mean, std_name: str, init_std, low: Tensor, high: Tensor, E: int, horizon: int, like: Tensor,
              strict: bool) -> tuple[Tensor, Tensor]:
    """The sampling distribution's mean and std ``[E, horizon, act_dim]``: the warm start (default mid-range) and
    the given std (default a quarter of the range); ``strict``: the std must be > 0, else >= 0."""
    A = low.numel()
    fix = "pass [E, horizon, act_dim] or [horizon, act_dim] (e.g. shift_plan(result.plan, low, high))"
    mean = (_as_plan("init_mean", init_mean, E, horizon, A, like, fix) if init_mean is not None
            else ((low + high) / 2).expand(E, horizon, A))
    mean = mean.clamp(low, high).contiguous()
    if init_std is None:
        return mean, ((high - low) / 4).expand(E, horizon, A).contiguous()
    std = _as_plan(std_name, init_std, E, horizon, A, like, "pass a scalar or [act_dim] in action units")
    if (std <= 0).any() if strict else (std < 0).any():
        raise ValueError(f"{std_name} must be {'> 0' if strict else '>= 0'}, got min {float(std.min())}: "
                         f"it is the standard deviation of the sampled actions")
    return mean, std.contiguous()


def _noise(kind: str, generator: torch.Generator | None, E: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """``[E, *shape]`` uniform [0, 1) or standard normal noise, drawn environment by environment."""
    gen_device = generator.device if generator is not None else like.device
    fn = torch.rand if kind == "uniform" else torch.randn
    out = torch.empty((E, *shape), dtype=like.dtype, device=like.device)
    for e in range(E):  # one draw per env: the stream is the same as planning each env alone
        if gen_device == like.device:
            fn(shape, generator=generator, out=out[e])  # out[e] is contiguous: drawn in place
        else:
            out[e] = fn(shape, generator=generator, dtype=like.dtype, device=gen_device)
    return out


def _autocast(device: torch.device, dtype: torch.dtype | None, enabled: bool = True):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _returns(dynamics: Dynamics, reward_fn: RewardFn, termination_fn, obs: Tensor, actions: Tensor,
             matmul_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """Returns ``[E, N]`` (``-inf`` where non-finite) and the non-finite mask ``[E, N]`` of ``actions[E, N, H, A]``.

    With ``matmul_dtype``, one autocast region spans the whole rollout (so autocast's cache of cast
    weights lives across the ``H`` model calls) and the reward / termination run with autocast off.
    """
    E, N, H, A = actions.shape
    B = E * N
    x = obs.unsqueeze(1).expand(E, N, obs.shape[-1]).reshape(B, obs.shape[-1])
    steps = actions.permute(2, 0, 1, 3).reshape(H, B, A)  # one contiguous copy: steps[t] is [B, A]
    ret = torch.zeros(B, dtype=obs.dtype, device=obs.device)
    bad = torch.zeros(B, dtype=torch.bool, device=obs.device)
    alive = torch.ones(B, dtype=torch.bool, device=obs.device) if termination_fn is not None else None
    zero = torch.zeros((), dtype=obs.dtype, device=obs.device)
    with _autocast(obs.device, matmul_dtype):
        for t in range(H):
            a = steps[t]
            nxt = dynamics(x, a)
            if t == 0 and (not isinstance(nxt, Tensor) or nxt.shape != x.shape):
                raise ValueError(f"dynamics(obs[{B}, {x.shape[-1]}], action[{B}, {A}]) must return next_obs "
                                 f"[{B}, {x.shape[-1]}], got {getattr(nxt, 'shape', type(nxt).__name__)}")
            nxt = nxt.to(obs.dtype)
            with _autocast(obs.device, matmul_dtype, enabled=False):
                r = reward_fn(x, a, nxt)
                if t == 0 and (not isinstance(r, Tensor) or r.numel() != B):
                    raise ValueError(f"reward_fn(obs, action, next_obs) with batch {B} must return Tensor[{B}], got "
                                     f"{getattr(r, 'shape', type(r).__name__)}")
                r = r.reshape(B)
                # a row is finite iff its sum is (up to overflow past ~3e38, a garbage state anyway);
                # 5x cheaper than isfinite(nxt).all(-1)
                obs_bad = ~torch.isfinite(nxt.sum(-1))
                if alive is None:
                    ret.add_(r)  # NaN/inf rewards propagate into ret: checked once after the loop
                    bad.logical_or_(obs_bad)
                else:
                    ret.add_(torch.where(alive, r, zero))
                    bad.logical_or_(alive & obs_bad)
                    done = termination_fn(x, a, nxt)
                    if t == 0 and (not isinstance(done, Tensor) or done.numel() != B):
                        raise ValueError(f"termination_fn(obs, action, next_obs) with batch {B} must return "
                                         f"BoolTensor[{B}], got {getattr(done, 'shape', type(done).__name__)}")
                    alive.logical_and_(~done.reshape(B).to(torch.bool))
            x = nxt
    bad.logical_or_(~torch.isfinite(ret))
    ret.masked_fill_(bad, -math.inf)
    return ret.view(E, N), bad.view(E, N)


def candidate_returns(dynamics: Dynamics, reward_fn: RewardFn, obs: Tensor, actions: Tensor,
                      termination_fn=None) -> Tensor:
    """Each candidate's return under ``dynamics``: ``[E, N]`` for ``obs [E, obs_dim]`` and action sequences
    ``actions [E, N, H, act_dim]`` (``-inf`` where non-finite); what every planner here scores with. Used to
    compare a learned model's ranking of candidates with the true dynamics' (:mod:`lit_meta.rl.diagnostics`)."""
    with torch.no_grad():
        return _returns(dynamics, reward_fn, termination_fn, obs, actions, None)[0]


def _safe_plan(low: Tensor, high: Tensor, E: int, horizon: int) -> Tensor:
    return torch.zeros_like(low).clamp(low, high).expand(E, horizon, low.numel())


def _finish(plan: Tensor, expected: Tensor, n_bad: Tensor, fallback: Tensor, low: Tensor, high: Tensor,
            unbatched: bool) -> PlanResult:
    E, H, _ = plan.shape
    plan = torch.where(fallback[:, None, None], _safe_plan(low, high, E, H), plan).clamp(low, high)
    expected = expected.masked_fill(fallback, -math.inf)
    res = PlanResult(plan[:, 0].clone(), plan.contiguous(), expected, n_bad, fallback)
    if unbatched:
        res = PlanResult(*(t[0] for t in res))
    return res


# ----------------------------------------------------------------------------------------------------
# planners


def random_shooting(dynamics: Dynamics, reward_fn: RewardFn, obs: Tensor, *, horizon: int = 10,
                    n_candidates: int = 500, action_low: Bound, action_high: Bound, act_dim: int | None = None,
                    generator: torch.Generator | None = None, termination_fn=None,
                    matmul_dtype: torch.dtype | None = None) -> PlanResult:
    """Random shooting (Nagabandi et al. 2018): ``argmax_k sum_t r(s_t, a_t^k, s_t+1)``, ``a^k ~ U[low, high]``.

    arXiv 1708.02596; GrBAL/ReBAL (Nagabandi et al. 2019) plan with it: 500 candidates, horizon 10.

    Args:
        dynamics: ``dynamics(obs[B, obs_dim], action[B, act_dim]) -> next_obs[B, obs_dim]`` (module docstring).
        reward_fn: ``reward_fn(obs, action, next_obs) -> Tensor[B]`` (reward per step, env units).
        obs: ``[E, obs_dim]`` current observations of ``E`` environments (or ``[obs_dim]``: unbatched result).
        horizon: planning horizon H in env steps (paper: 10).
        n_candidates: action sequences sampled per environment (paper: 500).
        action_low, action_high: action bounds, ``[act_dim]`` (or scalars with ``act_dim``).
        generator: ``torch.Generator`` for the candidates (global RNG if None).
        termination_fn: ``termination_fn(obs, action, next_obs) -> BoolTensor[B]``; rewards after the
            terminating step count 0. None: never terminates.
        matmul_dtype: e.g. ``torch.bfloat16``: run ``dynamics`` under ``torch.autocast`` with this dtype
            (states, rewards and returns stay in ``obs.dtype``). None (default): no autocast.

    Returns:
        :class:`PlanResult`; ``plan`` is the best candidate, ``expected_return`` its model return.
        The dynamics is called ``horizon`` times, on ``E * n_candidates`` rows each.
    """
    obs, unbatched, low, high = _check_common(dynamics, reward_fn, termination_fn, obs, horizon, n_candidates,
                                              action_low, action_high, act_dim, generator)
    E, A = obs.shape[0], low.numel()
    with torch.no_grad():
        actions = _noise("uniform", generator, E, (n_candidates, horizon, A), obs)
        actions.mul_(high - low).add_(low)
        ret, bad = _returns(dynamics, reward_fn, termination_fn, obs, actions, matmul_dtype)
        best_ret, best = ret.max(dim=1)
        plan = actions[torch.arange(E, device=obs.device), best]
        return _finish(plan, best_ret, bad.sum(1), bad.all(1), low, high, unbatched)


def cem(dynamics: Dynamics, reward_fn: RewardFn, obs: Tensor, *, horizon: int = 10, n_candidates: int = 500,
        action_low: Bound, action_high: Bound, act_dim: int | None = None, iterations: int = 5,
        n_elites: int = 50, init_mean: Tensor | None = None, init_std: float | Tensor | None = None,
        alpha: float = 0.1, return_mean_elites: bool = False, generator: torch.Generator | None = None,
        termination_fn=None, matmul_dtype: torch.dtype | None = None) -> PlanResult:
    """CEM (Rubinstein 1999; Botev et al. 2013): refit ``N(mu, sigma)`` to the top-k of ``clip(mu + sigma * eps)``.

    As in PETS (Chua et al. 2018, arXiv 1805.12114). Each iteration samples ``n_candidates`` sequences
    ``clip(mu + sigma * eps, low, high)``, scores them with the model and updates
    ``mu <- alpha * mu + (1 - alpha) * mean(elites)``, ``sigma <- alpha * sigma + (1 - alpha) * std(elites)``
    (per step and action dimension; non-finite candidates are never elites, and an environment with no
    finite candidate keeps its ``mu, sigma``).

    Args (those not listed: as :func:`random_shooting`):
        iterations: CEM iterations (default 5); the dynamics is called ``iterations * horizon`` times.
        n_elites: elites refitted per iteration, ``1 <= n_elites <= n_candidates`` (default 50).
        init_mean: warm start ``mu``: ``[E, horizon, act_dim]`` or ``[horizon, act_dim]``, usually
            ``shift_plan(previous.plan, low, high)``; None: the middle of the bounds.
        init_std: initial ``sigma`` (scalar, ``[act_dim]``, ... broadcast to ``[E, horizon, act_dim]``, action
            units); None (default): ``(high - low) / 4`` (PETS). Reset every call (not warm-started).
        alpha: smoothing weight of the OLD mean/std, in ``[0, 1)`` (PETS: 0.1).
        return_mean_elites: False (default): the plan is the best candidate seen in any iteration, with its
            return; True: the final ``mu``, with the last elites' mean return.

    Returns:
        :class:`PlanResult` (``n_nonfinite`` summed over the iterations).
    """
    obs, unbatched, low, high = _check_common(dynamics, reward_fn, termination_fn, obs, horizon, n_candidates,
                                              action_low, action_high, act_dim, generator)
    _check_cem_settings(n_candidates, iterations, n_elites, alpha)
    E, A = obs.shape[0], low.numel()
    mean, std = _gaussian(init_mean, "init_std", init_std, low, high, E, horizon, obs, strict=False)
    with torch.no_grad():
        eps = _noise("normal", generator, E, (iterations, n_candidates, horizon, A), obs)
        n_bad = torch.zeros(E, dtype=torch.long, device=obs.device)
        best_ret = torch.full((E,), -math.inf, dtype=obs.dtype, device=obs.device)
        best_plan = mean.clone()
        elite_ret_mean = best_ret
        gather_idx_shape = (E, n_elites, horizon, A)
        for i in range(iterations):
            actions = torch.addcmul(mean.unsqueeze(1), std.unsqueeze(1), eps[:, i]).clamp_(low, high)
            ret, bad = _returns(dynamics, reward_fn, termination_fn, obs, actions, matmul_dtype)
            n_bad += bad.sum(1)
            top_ret, idx = ret.topk(n_elites, dim=1)  # [E, K], best first
            elites = actions.gather(1, idx[:, :, None, None].expand(gather_idx_shape))
            w = torch.isfinite(top_ret).to(obs.dtype)[:, :, None, None]  # non-finite are no elites
            count = w.sum(1)  # [E, 1, 1]
            has = count > 0
            denom = count.clamp_min(1)
            e_mean = (w * elites).sum(1) / denom
            e_std = ((w * (elites - e_mean.unsqueeze(1)).square()).sum(1) / denom).sqrt()
            mean = torch.where(has, alpha * mean + (1 - alpha) * e_mean, mean)
            std = torch.where(has, alpha * std + (1 - alpha) * e_std, std)
            better = top_ret[:, 0] > best_ret
            best_ret = torch.where(better, top_ret[:, 0], best_ret)
            best_plan = torch.where(better[:, None, None], elites[:, 0], best_plan)
            finite_top = torch.where(w[:, :, 0, 0] > 0, top_ret, torch.zeros_like(top_ret))
            elite_ret_mean = torch.where(has[:, 0, 0], finite_top.sum(1) / denom[:, 0, 0], -math.inf)
        fallback = ~torch.isfinite(best_ret)
        if return_mean_elites:
            return _finish(mean, elite_ret_mean, n_bad, fallback, low, high, unbatched)
        return _finish(best_plan, best_ret, n_bad, fallback, low, high, unbatched)


def mppi(dynamics: Dynamics, reward_fn: RewardFn, obs: Tensor, *, horizon: int = 10, n_candidates: int = 500,
         action_low: Bound, action_high: Bound, act_dim: int | None = None, temperature: float = 1.0,
         noise_std: float | Tensor | None = None, iterations: int = 1, init_mean: Tensor | None = None,
         generator: torch.Generator | None = None, termination_fn=None,
         matmul_dtype: torch.dtype | None = None) -> PlanResult:
    """MPPI (Williams et al. 2017): ``U <- sum_k w_k clip(U + eps_k)``, ``w = softmax(R_k / lambda)``.

    "Information theoretic MPC for model-based RL", ICRA 2017. Each iteration perturbs the nominal
    sequence ``U`` with Gaussian noise ``eps ~ N(0, noise_std^2)``, clips to the bounds, scores the
    candidates with the model and replaces ``U`` by their return-weighted average (weights
    ``exp((R_k - max R) / temperature)``, zero for non-finite candidates; an environment with none finite
    keeps ``U``).

    Args (those not listed: as :func:`random_shooting`):
        temperature: lambda > 0, in return units (default 1.0): small -> greedy (best candidate), large ->
            plain average. Scale it with the size of the returns.
        noise_std: exploration std (scalar, ``[act_dim]``, ... broadcast to ``[E, horizon, act_dim]``, action
            units); None (default): ``(high - low) / 4``.
        iterations: MPPI updates per call (default 1, as Williams et al.); dynamics calls: ``iterations * horizon``.
        init_mean: warm-start ``U`` (``[E, horizon, act_dim]`` or ``[horizon, act_dim]``, usually
            ``shift_plan(previous.plan, low, high)``); None: the middle of the bounds.

    Returns:
        :class:`PlanResult`: ``plan`` is the updated ``U``; ``expected_return`` the weighted mean of the
        last iteration's candidate returns.
    """
    obs, unbatched, low, high = _check_common(dynamics, reward_fn, termination_fn, obs, horizon, n_candidates,
                                              action_low, action_high, act_dim, generator)
    _check_mppi_settings(temperature, iterations)
    E, A = obs.shape[0], low.numel()
    mean, std = _gaussian(init_mean, "noise_std", noise_std, low, high, E, horizon, obs, strict=True)
    with torch.no_grad():
        eps = _noise("normal", generator, E, (iterations, n_candidates, horizon, A), obs)
        n_bad = torch.zeros(E, dtype=torch.long, device=obs.device)
        expected = torch.full((E,), -math.inf, dtype=obs.dtype, device=obs.device)
        ever_finite = torch.zeros(E, dtype=torch.bool, device=obs.device)
        for i in range(iterations):
            actions = torch.addcmul(mean.unsqueeze(1), std.unsqueeze(1), eps[:, i]).clamp_(low, high)
            ret, bad = _returns(dynamics, reward_fn, termination_fn, obs, actions, matmul_dtype)
            n_bad += bad.sum(1)
            has = ~bad.all(1)
            ever_finite |= has
            top = ret.max(1, keepdim=True).values
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            w = ((ret - top) / temperature).exp()  # -inf -> 0
            w = w / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
            new_mean = torch.einsum("en,enha->eha", w, actions)
            mean = torch.where(has[:, None, None], new_mean, mean)
            r = torch.where(bad, torch.zeros_like(ret), ret)
            expected = torch.where(has, (w * r).sum(1), expected)
        return _finish(mean, expected, n_bad, ~ever_finite, low, high, unbatched)


def shift_plan(plan: Tensor, action_low: Bound, action_high: Bound, *, pad: str | float | Tensor = "mid") -> Tensor:
    """Warm start for the next MPC step: ``plan[..., 1:, :]`` followed by one padding step, clipped to the bounds.

    Args:
        plan: ``[E, horizon, act_dim]`` or ``[horizon, act_dim]`` (``PlanResult.plan``).
        action_low, action_high: the bounds (as for the planners).
        pad: the appended last step: ``"mid"`` (default, the middle of the bounds, as PETS), ``"last"``
            (repeat the last action), or a number / ``[act_dim]`` tensor.

    Returns:
        A new tensor of ``plan``'s shape; pass it as ``init_mean`` to :func:`cem` / :func:`mppi`.
    """
    if not isinstance(plan, Tensor) or plan.ndim not in (2, 3) or plan.shape[-2] < 1:
        raise ValueError(f"plan must be a Tensor [E, horizon, act_dim] or [horizon, act_dim], got "
                         f"{getattr(plan, 'shape', type(plan).__name__)}: pass PlanResult.plan")
    low, high = action_bounds(action_low, action_high, act_dim=plan.shape[-1], dtype=plan.dtype, device=plan.device)
    if isinstance(pad, str):
        if pad == "mid":
            last = ((low + high) / 2).expand_as(plan[..., -1:, :])
        elif pad == "last":
            last = plan[..., -1:, :]
        else:
            raise ValueError(f"pad={pad!r}: use 'mid', 'last', a number or an [act_dim] tensor")
    else:
        last = torch.as_tensor(pad, dtype=plan.dtype, device=plan.device).expand_as(plan[..., -1:, :])
    return torch.cat([plan[..., 1:, :], last], dim=-2).clamp(low, high)


# ----------------------------------------------------------------------------------------------------
# torchrl adapter: the same model and reward as a torchrl env, to run torchrl's CEMPlanner / MPPIPlanner


def torchrl_model_env(dynamics: Dynamics, reward_fn: RewardFn, obs_dim: int, action_low: Bound, action_high: Bound,
                      *, termination_fn=None, device="cpu", dtype: torch.dtype = torch.float32):
    """A ``torchrl`` model-based env (``ModelBasedEnvBase``) stepping ``dynamics`` and scoring with ``reward_fn``.

    For ``torchrl.modules.CEMPlanner(env, horizon, iterations, n_candidates, n_elites)`` and
    ``MPPIPlanner(env, torchrl_return_to_go(), 1 / temperature, ...)`` on the same model as our planners
    (tests and ``benchmarks/planning.py`` compare them). Keys: ``"observation"`` ``[..., obs_dim]``,
    ``"action"`` ``[..., act_dim]`` (Bounded: torchrl's planners clip to it), reward ``[..., 1]``;
    ``done``/``terminated`` from ``termination_fn`` (all False if None). ``env.reset(td)`` needs a
    tensordict holding ``"observation"``.
    """
    from tensordict import TensorDict
    from tensordict.nn import TensorDictModule
    from torchrl.data import Bounded, Composite, Unbounded
    from torchrl.envs.model_based import ModelBasedEnvBase

    low, high = action_bounds(action_low, action_high, dtype=dtype, device=device)

    class _Step(torch.nn.Module):
        def forward(self, obs, action):
            nxt = dynamics(obs, action)
            reward = reward_fn(obs, action, nxt).reshape(*nxt.shape[:-1], 1).to(nxt.dtype)
            if termination_fn is None:
                done = torch.zeros(*nxt.shape[:-1], 1, dtype=torch.bool, device=nxt.device)
            else:
                done = termination_fn(obs, action, nxt).reshape(*nxt.shape[:-1], 1).to(torch.bool)
            return nxt, reward, done, done.clone()

    class _ModelEnv(ModelBasedEnvBase):
        def __init__(self):
            world_model = TensorDictModule(_Step(), in_keys=["observation", "action"],
                                           out_keys=["observation", "reward", "done", "terminated"])
            super().__init__(world_model, device=device, batch_size=torch.Size([]))
            self.observation_spec = Composite(observation=Unbounded((obs_dim,), dtype=dtype, device=device))
            self.state_spec = Composite(observation=Unbounded((obs_dim,), dtype=dtype, device=device))
            self.action_spec = Bounded(low, high, (low.numel(),), dtype=dtype, device=device)
            self.reward_spec = Unbounded((1,), dtype=dtype, device=device)

        def _reset(self, tensordict=None, **kwargs):
            if tensordict is None or "observation" not in tensordict.keys():
                raise ValueError("reset this model env with a tensordict holding 'observation'")
            return TensorDict({"observation": tensordict["observation"]}, batch_size=tensordict.batch_size,
                              device=self.device)

    return _ModelEnv()


def torchrl_return_to_go():
    """The ``advantage_module`` that makes torchrl's ``MPPIPlanner`` weight candidates by their return.

    Writes ``"advantage"`` = the undiscounted reward-to-go (time dim -2), whose first step is the return.
    """

    class _ReturnToGo(torch.nn.Module):
        def forward(self, td):
            r = td.get(("next", "reward"))
            td.set("advantage", r.flip(-2).cumsum(-2).flip(-2))
            return td

    return _ReturnToGo()
