"""A replay buffer of whole rollouts, in order, with windows that never cross a rollout or a task.

Storage is torchrl's ``LazyTensorStorage`` (one preallocated tensor per key, allocated on the first
write). Window sampling is ours: torchrl's ``SliceSampler`` finds the trajectory runs again on every
call (measured here: 48-80 ms for 32 windows of 32 from 200k transitions, longer than a GrBAL step),
while this buffer keeps the valid window starts as it grows, so a meta-batch is one ``randint`` and one
gather. Rollouts are appended whole, so storage order is time order within every rollout.

Per transition the buffer keeps ``obs``, ``action``, ``next_obs`` (float32), ``reward`` (float32),
``terminated`` (bool), ``task_vector`` (float32 ``[task_dim]``, the env's numeric task code),
``rollout`` (int64 id) and ``segment`` (int64 id of a run of one task inside one rollout: a task that
changes mid-episode starts a new segment).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
from tensordict import TensorDict
from torch import Tensor
from torchrl.data import LazyTensorStorage

from lit_meta.episode import Transitions, Window

#: Keys of one transition, with their dtypes.
FIELDS: dict[str, torch.dtype] = {
    "obs": torch.float32, "action": torch.float32, "next_obs": torch.float32, "reward": torch.float32,
    "terminated": torch.bool, "task_vector": torch.float32, "rollout": torch.int64, "segment": torch.int64,
}


class Rollout(NamedTuple):
    """One episode of one environment, in time order: ``obs``/``next_obs`` ``[L, obs_dim]``, ``action``
    ``[L, act_dim]``, ``reward``/``terminated`` ``[L]``, ``task_vector`` ``[L, task_dim]``; ``seed`` is
    the seed its env was reset with."""

    obs: Tensor
    action: Tensor
    next_obs: Tensor
    reward: Tensor
    terminated: Tensor
    task_vector: Tensor
    seed: int

    @property
    def length(self) -> int:
        return self.obs.shape[0]


def segment_ids(task_vector: Tensor) -> Tensor:
    """``[L]`` int64 ids 0, 0, 1, ...: a new id wherever the task changes between consecutive steps."""
    changed = (task_vector[1:] != task_vector[:-1]).any(dim=-1) if task_vector.shape[-1] else \
        torch.zeros(max(len(task_vector) - 1, 0), dtype=torch.bool)
    return torch.cat([torch.zeros(1, dtype=torch.int64), changed.long().cumsum(0)]) if len(task_vector) else \
        torch.zeros(0, dtype=torch.int64)


class RolloutBuffer:
    """Whole rollouts in insertion order, sampled as windows or as single transitions.

    Args:
        capacity: transitions it can hold (default 1,000,000). Adding past it raises (the paper keeps all
            aggregated data; overwriting old rollouts would change the experiment silently).
        window: ``past_window + future_window``, the length of a sampled window (default 32).
    """

    def __init__(self, capacity: int = 1_000_000, window: int = 32) -> None:
        if capacity < 1 or window < 1:
            raise ValueError(f"capacity={capacity} and window={window} must be positive integers")
        self.capacity, self.window = capacity, window
        self.storage = LazyTensorStorage(capacity)
        self.starts = torch.zeros(0, dtype=torch.int64)  # storage index of every valid window's first step
        self.n_rollouts = 0
        self.n_segments = 0

    def __len__(self) -> int:
        return len(self.storage)

    @property
    def n_windows(self) -> int:
        return len(self.starts)

    def add(self, rollouts: list[Rollout]) -> None:
        """Append rollouts whole, in the given order (the order must not depend on the process)."""
        rollouts = [r for r in rollouts if r.length]
        n_new = sum(r.length for r in rollouts)
        if len(self) + n_new > self.capacity:
            raise ValueError(
                f"the replay buffer holds {len(self)} of its capacity={self.capacity} transitions and cannot take "
                f"{n_new} more; raise capacity (the paper keeps all aggregated data) or collect fewer rollouts"
            )
        for rollout in rollouts:
            for name in ("obs", "action", "next_obs", "reward"):
                if not torch.isfinite(getattr(rollout, name)).all():
                    raise ValueError(f"rollout (seed {rollout.seed}) has non-finite {name}; "
                                     "unstable steps must be dropped before they reach the buffer")
            self._append(rollout)

    def _append(self, rollout: Rollout) -> None:
        n, offset = rollout.length, len(self)
        segment = segment_ids(rollout.task_vector.reshape(n, -1))
        data = {
            "obs": rollout.obs, "action": rollout.action, "next_obs": rollout.next_obs, "reward": rollout.reward,
            "terminated": rollout.terminated, "task_vector": rollout.task_vector.reshape(n, -1),
            "rollout": torch.full((n,), self.n_rollouts), "segment": self.n_segments + segment,
        }
        data = TensorDict({k: v.to(FIELDS[k]) for k, v in data.items()}, batch_size=[n])
        self.storage.set(torch.arange(offset, offset + n), data)
        # Valid starts: positions whose next window - 1 steps are in the same segment.
        last = torch.arange(max(n - self.window + 1, 0))
        if len(last):
            same = segment[last] == segment[last + self.window - 1]
            self.starts = torch.cat([self.starts, offset + last[same]])
        self.n_rollouts += 1
        self.n_segments += int(segment[-1]) + 1

    def data(self, key: str) -> Tensor:
        """The stored ``key`` tensor of all transitions, ``[len, ...]`` (a view)."""
        return self.storage._storage[key][: len(self)]

    def segments(self) -> list[Rollout]:
        """Every stored segment (one task of one rollout) as a :class:`Rollout`, in storage order (``seed`` -1)."""
        seg = self.data("segment")
        if not len(seg):
            return []
        cuts = (torch.nonzero(seg[1:] != seg[:-1]).flatten() + 1).tolist()
        keys = ("obs", "action", "next_obs", "reward", "terminated", "task_vector")
        return [Rollout(*(self.data(k)[a:b] for k in keys), seed=-1)
                for a, b in zip([0, *cuts], [*cuts, len(seg)])]

    def sample_windows(self, n: int, generator: torch.Generator, past_window: int) -> Window:
        """``n`` windows chosen uniformly among all valid ones, split into ``past_window`` past steps and
        ``window - past_window`` future steps."""
        if not self.n_windows:
            raise ValueError(
                f"no rollout segment in the buffer is as long as a window ({self.window} transitions = past_window "
                f"+ future_window); collect longer rollouts (rollout_length, change_every) or shorten the windows"
            )
        return self.windows(self.starts[torch.randint(self.n_windows, (n,), generator=generator)], past_window)

    def windows(self, starts: Tensor, past_window: int) -> Window:
        """The windows beginning at storage indices ``starts`` (valid ones: from :attr:`starts`)."""
        n = len(starts)
        index = (starts[:, None] + torch.arange(self.window)).reshape(-1)
        obs, action, next_obs = (self.data(k)[index].view(n, self.window, -1) for k in ("obs", "action", "next_obs"))
        m = past_window
        return Window(obs[:, :m], action[:, :m], next_obs[:, :m], obs[:, m:], action[:, m:], next_obs[:, m:])

    def sample_transitions(self, n: int, generator: torch.Generator) -> Transitions:
        """``n`` transitions drawn uniformly (with replacement) from the whole buffer."""
        if not len(self):
            raise ValueError("the replay buffer is empty: collect rollouts before sampling")
        index = torch.randint(len(self), (n,), generator=generator)
        return Transitions(self.data("obs")[index], self.data("action")[index], self.data("next_obs")[index])

    def stats(self) -> dict[str, Tensor]:
        """Mean and standard deviation (float32, std >= 1e-6) of ``obs``, ``action`` and ``delta`` =
        next_obs - obs over every stored transition, computed in float64."""
        values = {"obs": self.data("obs"), "action": self.data("action"),
                  "delta": self.data("next_obs") - self.data("obs")}
        out = {}
        for name, value in values.items():
            value = value.double()
            out[f"{name}_mean"] = value.mean(0).float()
            out[f"{name}_std"] = value.std(0, correction=0).clamp_min(1e-6).float()
        return out

    def state_dict(self) -> dict:
        """Tensors and ints only (loads with ``torch.load(weights_only=True)``), sized to what is stored."""
        return {"capacity": self.capacity, "window": self.window, "n_rollouts": self.n_rollouts,
                "n_segments": self.n_segments, "starts": self.starts.clone(),
                "data": {k: self.data(k).clone() for k in FIELDS} if len(self) else {}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore exactly what :meth:`state_dict` saved (capacity and window must match)."""
        if (state["capacity"], state["window"]) != (self.capacity, self.window):
            raise ValueError(
                f"the saved buffer has capacity={state['capacity']}, window={state['window']} but this one has "
                f"capacity={self.capacity}, window={self.window}; use the settings the checkpoint was made with"
            )
        self.storage = LazyTensorStorage(self.capacity)
        data = state["data"]
        if data:
            n = len(data["obs"])
            self.storage.set(torch.arange(n), TensorDict(dict(data), batch_size=[n]))
        self.starts = state["starts"].clone()
        self.n_rollouts, self.n_segments = state["n_rollouts"], state["n_segments"]
