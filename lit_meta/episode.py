"""Batch types shared by the DataModules and the LightningModules.

A few-shot batch is one :class:`Episode`: one tensor per field with a leading task dimension ``T``
(the tasks of this process's share of the meta-batch). Images stay ``uint8`` until they reach the
device; :func:`to_float` turns them into ``float32`` in ``[0, 1]`` there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Episode(NamedTuple):
    """A meta-batch of ``T`` few-shot tasks.

    Shapes (classification, ``N = n_way``, ``K = k_shot``, ``Q = k_query``):
        support_x ``[T, N*K, C, H, W]`` (uint8 on the host), support_y ``[T, N*K]`` int64 in ``0..N-1``,
        query_x ``[T, N*Q, C, H, W]``, query_y ``[T, N*Q]``.
    Regression (sinusoid): x ``[T, K, 1]`` and y ``[T, K, 1]`` float32.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def n_tasks(self) -> int:
        return self.support_x.shape[0]


def to_float(episode: Episode) -> Episode:
    """Convert uint8 images to floats in [0, 1] of the default dtype (float32 unless set otherwise), on whatever
    device the episode is on."""
    def conv(t: Tensor) -> Tensor:
        return t.to(torch.get_default_dtype()).div_(255.0) if t.dtype == torch.uint8 else t

    return Episode(conv(episode.support_x), episode.support_y, conv(episode.query_x), episode.query_y)


class Window(NamedTuple):
    """A meta-batch of ``T`` dynamics-learning tasks: windows of consecutive transitions of one rollout.

    The first ``M = past_window`` transitions are what the model adapts on, the next ``K = future_window``
    what the adapted model is scored on (GrBAL/ReBAL, Nagabandi et al. 2019, Sec. 4). A window never
    spans two rollouts or two tasks. Shapes: ``past_*`` ``[T, M, dim]``, ``future_*`` ``[T, K, dim]``;
    ``*_obs`` and ``*_next_obs`` ``[..., obs_dim]``, ``*_action`` ``[..., act_dim]``; float32.
    """

    past_obs: Tensor
    past_action: Tensor
    past_next_obs: Tensor
    future_obs: Tensor
    future_action: Tensor
    future_next_obs: Tensor

    @property
    def n_tasks(self) -> int:
        return self.past_obs.shape[0]


class Transitions(NamedTuple):
    """A batch of ``B`` independent transitions (non-adaptive MB-MPC): ``obs``/``next_obs`` ``[B, obs_dim]``,
    ``action`` ``[B, act_dim]``; float32."""

    obs: Tensor
    action: Tensor
    next_obs: Tensor
