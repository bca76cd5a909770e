"""How good is a learned dynamics model for planning? Open-loop prediction error and candidate ranking.

A planner only needs the model to *rank* its candidate action sequences like the true dynamics would; a
low one-step training loss does not say that. These functions measure, on held-out-task episodes:

* :func:`open_loop_errors`: from every start state of the episodes, the model is rolled out open loop on
  the recorded actions for ``horizon`` steps (adapted first on the M transitions before the start, when
  ``adapt``); the squared error of the predicted observation after 1 and after ``horizon`` steps, in units
  of the training data's observation std (mean over dimensions), and the error and bias of the predicted
  ``horizon``-step return (the env's ``reward_fn`` on predicted vs recorded transitions).
* :func:`candidate_ranking`: at one state, the Spearman rank correlation between the model's and the
  true dynamics' returns of the same candidate sequences, and what the model's pick is worth under the
  true dynamics (``pick_true / best_true``; 1 = the model picks the truly best candidate).

``benchmarks/model_quality.py`` runs both on a trained learner; the MPC controller's own episodes give
the states it visits (:class:`RankingProbe` scores the candidates there while it acts).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from lit_meta.rl.buffer import Rollout
from lit_meta.rl.control import adapted_params, model_dynamics
from lit_meta.rl.planners import candidate_returns


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation along the last dimension (``[..., N]`` -> ``[...]``; no tie correction)."""
    ra = a.argsort(-1).argsort(-1).to(torch.float64)
    rb = b.argsort(-1).argsort(-1).to(torch.float64)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()


def _at_starts(learner, rollouts: Sequence[Rollout], starts: Sequence[tuple[int, int]], past_window: int,
               adapt: bool) -> tuple[Callable[[str, int, int], Tensor], dict[str, Tensor]]:
    """For steps ``starts`` = ``[(rollout index, t), ...]``: ``gather(key, offset, length)`` -> ``[S, length, ...]``
    (steps ``t + offset ...``, on the learner's device and dtype), and the weights adapted on the ``past_window``
    transitions before each ``t`` (``adapt``) or the meta-learned ones."""
    norm = learner.normalizer

    def gather(key: str, offset: int, length: int) -> Tensor:
        return torch.stack([getattr(rollouts[i], key)[t + offset:t + offset + length] for i, t in starts]).to(
            norm.obs_std.device, norm.obs_std.dtype)

    if not adapt:
        return gather, adapted_params(learner, len(starts))
    return gather, adapted_params(learner, len(starts), *(gather(k, -past_window, past_window)
                                                          for k in ("obs", "action", "next_obs")))


@torch.no_grad()
def open_loop_errors(learner, rollouts: Sequence[Rollout], reward_fn: Callable, horizon: int = 10,
                     past_window: int = 16, adapt: bool = True, stride: int = 5, chunk_size: int = 256
                     ) -> dict[str, float]:
    """Open-loop prediction quality of ``learner`` on ``rollouts`` (see the module docstring).

    Starts: every ``stride``-th step ``t >= past_window`` with ``t + horizon <= length``. Returns
    ``err_1`` and ``err_h`` (mean squared observation error after 1 and ``horizon`` steps, in units of the
    learner's observation std), ``return_err`` (mean |predicted - true| ``horizon``-step return),
    ``return_bias`` (mean predicted - true) and ``true_return`` (mean |true ``horizon``-step return|), ``n``.
    """
    norm = learner.normalizer
    starts = [(i, t) for i, r in enumerate(rollouts) for t in range(past_window, r.length - horizon + 1, stride)]
    if not starts:
        return {"err_1": float("nan"), "err_h": float("nan"), "return_err": float("nan"),
                "return_bias": float("nan"), "true_return": float("nan"), "n": 0}
    device = norm.obs_std.device
    sums = torch.zeros(5, dtype=torch.float64)
    for first in range(0, len(starts), chunk_size):
        chunk = starts[first:first + chunk_size]
        gather, params = _at_starts(learner, rollouts, chunk, past_window, adapt)
        step = model_dynamics(learner, params)
        obs, actions, true_next = gather("obs", 0, 1)[:, 0], gather("action", 0, horizon), gather("next_obs", 0, horizon)
        x, pred_ret, true_ret = obs, torch.zeros(len(chunk), device=device), torch.zeros(len(chunk), device=device)
        for h in range(horizon):
            nxt = step(x, actions[:, h])
            pred_ret += reward_fn(x, actions[:, h], nxt)
            true_ret += reward_fn(true_next[:, h - 1] if h else obs, actions[:, h], true_next[:, h])
            if h == 0:
                err_1 = ((nxt - true_next[:, 0]) / norm.obs_std).square().mean(-1)
            x = nxt
        err_h = ((x - true_next[:, -1]) / norm.obs_std).square().mean(-1)
        sums += torch.stack([err_1.sum(), err_h.sum(), (pred_ret - true_ret).abs().sum(),
                             (pred_ret - true_ret).sum(), true_ret.abs().sum()]).double().cpu()
    err_1, err_h, ret_err, bias, true_abs = (sums / len(starts)).tolist()
    return {"err_1": err_1, "err_h": err_h, "return_err": ret_err, "return_bias": bias, "true_return": true_abs,
            "n": len(starts)}


@torch.no_grad()
def candidate_ranking(model: Callable, true: Callable, reward_fn: Callable, obs: Tensor, actions: Tensor,
                      termination_fn: Callable | None = None) -> dict[str, Tensor]:
    """How the model ranks candidates ``actions [E, N, H, act_dim]`` from ``obs [E, obs_dim]`` against the truth.

    ``model`` and ``true`` are planner dynamics (e.g. :func:`~lit_meta.rl.control.model_dynamics` and
    :meth:`TrueDynamics.dynamics(H) <lit_meta.rl.true_dynamics.TrueDynamics.dynamics>`). Returns ``[E]``
    tensors: ``spearman`` (rank correlation of the returns), ``pick_value`` (true return of the model's best
    candidate over the truly best one's; NaN where the best true return is <= 0), ``pick_true`` /
    ``best_true`` (those true returns), ``model_bias`` (mean over candidates of model - true return),
    ``true_spread`` (standard deviation of the candidates' true returns: what there is to rank),
    ``error_spread`` (standard deviation over candidates of model - true return: the part of the model's error
    that reorders them; a constant bias reorders nothing) and ``slope`` (least-squares slope of the model's
    return on the true one over the candidates: 1 = the model sees the actions' effect at its true size, below 1 it
    under-reacts to the actions). Ranking needs ``error_spread`` well below ``true_spread``.
    """
    pred = candidate_returns(model, reward_fn, obs, actions, termination_fn)
    real = candidate_returns(true, reward_fn, obs, actions, termination_fn)
    return ranking_stats(pred, real)


def ranking_stats(pred: Tensor, real: Tensor) -> dict[str, Tensor]:
    """:func:`candidate_ranking`'s figures from the candidates' returns ``pred [E, N]`` (the model's) and ``real
    [E, N]`` (the true ones); non-finite returns are left out of the bias, spreads and slope."""
    rows = torch.arange(len(pred))
    pick_true, best_true = real[rows, pred.argmax(-1)], real.max(-1).values
    value = torch.where(best_true > 0, pick_true / best_true, torch.full_like(best_true, float("nan")))
    finite = torch.isfinite(pred) & torch.isfinite(real)
    n = finite.sum(-1).clamp_min(1)
    error = torch.where(finite, pred - real, torch.zeros_like(pred))
    bias = error.sum(-1) / n

    def centred(x: Tensor) -> Tensor:
        return torch.where(finite, x - torch.where(finite, x, torch.zeros_like(x)).sum(-1, keepdim=True) / n[:, None],
                           torch.zeros_like(x))

    p, r = centred(pred), centred(real)
    real_ss = r.square().sum(-1)
    return {"spearman": spearman(pred, real), "pick_value": value, "pick_true": pick_true, "best_true": best_true,
            "model_bias": bias, "true_spread": (real_ss / n).sqrt(),  # stds over the finite candidates (ddof 0)
            "error_spread": (centred(error).square().sum(-1) / n).sqrt(), "slope": (p * r).sum(-1) / real_ss}


class RankingProbe:
    """A policy wrapper: acts with ``controller`` and, every ``every`` steps, scores ``n_candidates`` uniform
    random candidate sequences at the visited states with the controller's (adapted) model and with the true
    dynamics (:func:`candidate_ranking`). Results accumulate in :attr:`records` (one dict of ``[E]`` arrays a
    probe).

    Args:
        controller: a learned-model :class:`~lit_meta.rl.control.MPCController` (its history gives the adaptation).
        true: a :class:`~lit_meta.rl.true_dynamics.TrueDynamics` bound to the envs being stepped.
        every: env steps between probes. n_candidates: candidates scored per probe (default 500).
        seed: seed of the candidates.
        behaviour: optional policy that chooses the actions instead of ``controller`` (e.g. the true-dynamics
            controller, to probe the states a good controller visits); ``controller`` then only records the
            transitions it adapts on.
    """

    def __init__(self, controller, true, every: int = 10, n_candidates: int = 500, seed: int = 0,
                 behaviour: Callable | None = None) -> None:
        self.controller, self.true, self.every, self.n_candidates = controller, true, every, n_candidates
        self.behaviour = behaviour
        self.generator = torch.Generator().manual_seed(seed)
        self.records: list[dict[str, np.ndarray]] = []
        self.steps = 0

    def reset(self, seeds: Sequence[int]) -> None:
        self.controller.reset(seeds)
        if hasattr(self.behaviour, "reset"):
            self.behaviour.reset(seeds)
        self.steps = 0

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        c = self.controller
        obs_t = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=c.device)
        if self.steps % self.every == 0:
            params = c.adapted_params(obs_t)
            E, A = obs_t.shape[0], c.low.numel()
            u = torch.rand(E, self.n_candidates, c.horizon, A, generator=self.generator).to(c.device)
            actions = c.low + u * (c.high - c.low)
            ranking = candidate_ranking(model_dynamics(c.learner, params), self.true.dynamics(c.horizon),
                                        c.reward_fn, obs_t, actions, c.termination_fn)
            self.records.append({k: v.cpu().numpy() for k, v in ranking.items()} | {"step": self.steps})
        self.steps += 1
        if self.behaviour is None:
            return c(obs)
        action = np.asarray(self.behaviour(obs), dtype=np.float32)
        c.record(obs_t, torch.as_tensor(action, device=c.device))
        return action

    def summary(self) -> dict[str, float]:
        """Means over every probe and env (NaNs left out) of ``spearman``, ``pick_value``, ``model_bias``,
        ``true_spread``, ``error_spread``, ``slope``, and ``n``, the number of probes x envs."""
        keys = ("spearman", "pick_value", "model_bias", "true_spread", "error_spread", "slope")
        if not self.records:
            return {**{k: float("nan") for k in keys}, "n": 0}
        cat = {k: np.concatenate([np.atleast_1d(r[k]) for r in self.records]) for k in keys}
        return {**{k: float(np.nanmean(cat[k])) for k in keys}, "n": int(len(cat["spearman"]))}


@torch.no_grad()
def errors_around_changes(learner, rollouts: Sequence[Rollout], past_window: int = 16, before: int = 16,
                          after: int = 48, adapt: bool = True) -> dict[str, np.ndarray]:
    """One-step prediction error around mid-episode task changes, as online adaptation meets them.

    A change is a step ``c`` whose ``task_vector`` differs from step ``c - 1``'s in the same rollout. For each
    offset ``o`` in ``[-before, after)`` the model predicts transition ``c + o`` (normalised state change,
    squared error averaged over dimensions), adapted on the ``past_window`` transitions just before it when
    ``adapt`` (they straddle the change for ``0 <= o < past_window``), with the meta-learned weights when not.
    Returns ``offsets [O]``, ``error [O]`` (mean over changes; NaN where no change has that offset in range),
    ``count [O]`` and ``n_changes``.
    """
    norm = learner.normalizer
    offsets = np.arange(-before, after)
    pairs = []
    n_changes = 0
    for i, r in enumerate(rollouts):
        tv = r.task_vector.reshape(r.length, -1)
        changes = (torch.nonzero((tv[1:] != tv[:-1]).any(-1)).flatten() + 1).tolist()
        n_changes += len(changes)
        pairs += [(i, c + o, k) for c in changes for k, o in enumerate(offsets) if past_window <= c + o < r.length]
    total, count = np.zeros(len(offsets)), np.zeros(len(offsets))
    for first in range(0, len(pairs), 256):
        chunk = pairs[first:first + 256]
        gather, params = _at_starts(learner, rollouts, [(i, t) for i, t, _ in chunk], past_window, adapt)
        obs, action, nxt = gather("obs", 0, 1), gather("action", 0, 1), gather("next_obs", 0, 1)
        output = learner.predict(params, norm.inputs(obs, action))
        err = (output - norm.targets(obs, nxt)).square().mean((-1, -2)).double().cpu().numpy()
        np.add.at(total, [k for _, _, k in chunk], err)
        np.add.at(count, [k for _, _, k in chunk], 1)
    with np.errstate(invalid="ignore"):
        error = total / count
    return {"offsets": offsets, "error": error, "count": count, "n_changes": n_changes}
