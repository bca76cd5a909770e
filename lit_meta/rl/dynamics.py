"""Dynamics-model plumbing shared by GrBAL, ReBAL and MB-MPC: normalisation and windows as episodes.

A model predicts the normalised state change: f(normalise(s), normalise(a)) ~ (s' - s - mu_delta) / sd_delta
(Nagabandi et al. 2018/2019). Observation dimensions that grow without bound (the x position the
reward needs) can be left out of the model's input with ``exclude_obs_dims``; their change is still
predicted.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from lit_meta.episode import Episode, Transitions, Window

STAT_NAMES = ("obs_mean", "obs_std", "action_mean", "action_std", "delta_mean", "delta_std")


class Normalizer(nn.Module):
    """Input/output normalisation of a dynamics model, kept as buffers (saved in checkpoints).

    Args:
        obs_dim: observation size. action_dim: action size.
        exclude_obs_dims: observation indices left out of the model's input (e.g. ``[0]``, HalfCheetah's x).
    """

    def __init__(self, obs_dim: int, action_dim: int, exclude_obs_dims: Sequence[int] = ()) -> None:
        super().__init__()
        bad = [d for d in exclude_obs_dims if not 0 <= d < obs_dim]
        if bad:
            raise ValueError(f"exclude_obs_dims={list(exclude_obs_dims)} has indices {bad} outside 0..{obs_dim - 1}")
        self.obs_dim, self.action_dim = obs_dim, action_dim
        keep = [d for d in range(obs_dim) if d not in set(exclude_obs_dims)]
        self.register_buffer("keep", torch.tensor(keep, dtype=torch.long), persistent=False)
        for name, size in (("obs", obs_dim), ("action", action_dim), ("delta", obs_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(size))
            self.register_buffer(f"{name}_std", torch.ones(size))

    @property
    def in_features(self) -> int:
        return len(self.keep) + self.action_dim

    def set_stats(self, stats: dict[str, Tensor]) -> None:
        """Copy the buffer statistics (``RolloutBuffer.stats()``) in, checking their sizes."""
        for name in STAT_NAMES:
            value = stats[name]
            target = getattr(self, name)
            if value.shape != target.shape:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)} but the model was built for {tuple(target.shape)}: "
                    f"obs_dim={self.obs_dim}, action_dim={self.action_dim} must match the environment's spaces"
                )
            target.copy_(value)

    def inputs(self, obs: Tensor, action: Tensor) -> Tensor:
        """Model input ``[..., in_features]``."""
        obs = (obs - self.obs_mean) / self.obs_std
        return torch.cat([obs.index_select(-1, self.keep), (action - self.action_mean) / self.action_std], dim=-1)

    def targets(self, obs: Tensor, next_obs: Tensor) -> Tensor:
        """Normalised state change ``[..., obs_dim]``: what the model learns to output."""
        return (next_obs - obs - self.delta_mean) / self.delta_std

    def next_obs(self, obs: Tensor, output: Tensor) -> Tensor:
        """Predicted next observation from the model's output."""
        return obs + output * self.delta_std + self.delta_mean

    def advance(self, inputs: Tensor, output: Tensor) -> Tensor:
        """The observation part of the next step's model input, from this step's input and output (the
        excluded dimensions are neither needed nor produced): an open-loop rollout in normalised units."""
        n_obs = len(self.keep)
        delta = (output * self.delta_std + self.delta_mean).index_select(-1, self.keep)
        return inputs[..., :n_obs] + delta / self.obs_std.index_select(-1, self.keep)

    def episode(self, window: Window) -> Episode:
        """A window as a regression episode: support = the M past transitions, query = the K future ones."""
        return Episode(self.inputs(window.past_obs, window.past_action), self.targets(window.past_obs, window.past_next_obs),
                       self.inputs(window.future_obs, window.future_action),
                       self.targets(window.future_obs, window.future_next_obs))

    def transitions(self, batch: Transitions) -> tuple[Tensor, Tensor]:
        """(inputs, targets) of a plain transition batch."""
        return self.inputs(batch.obs, batch.action), self.targets(batch.obs, batch.next_obs)


def open_loop_loss(net: nn.Module, normalizer: Normalizer, inputs: Tensor, targets: Tensor) -> Tensor:
    """The model rolled out open loop on recorded actions, scored at every step (a multi-step loss).

    ``inputs [B, H, in_features]`` and ``targets [B, H, obs_dim]`` are H consecutive transitions of B sequences
    (:meth:`Normalizer.inputs` / :meth:`Normalizer.targets`); only the first step's observation and every step's
    action are read from ``inputs``. Predicted state s_h+1 = s_h + f(s_h, a_h) (normalised change); the loss is
    mean_h mean_d ((s_h+1 - s*_h+1) / delta_std)^2 = mean_h mean_d (sum_{j<=h} f(s_j, a_j) - y_j)^2, which for
    H = 1 is the one-step MSE.
    """
    n_obs = len(normalizer.keep)
    x, error, total = inputs[:, 0], 0.0, 0.0
    for h in range(inputs.shape[1]):
        out = net(x)
        error = error + out - targets[:, h]  # state error after step h, in units of delta_std
        total = total + error.square().mean()
        if h + 1 < inputs.shape[1]:
            x = torch.cat([normalizer.advance(x, out), inputs[:, h + 1, n_obs:]], dim=-1)
    return total / inputs.shape[1]
