"""The sinusoid regression tasks of MAML (Finn et al. 2017, Sec. 5.1), generated on the fly.

Task: y = amplitude * sin(x - phase), amplitude ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5];
K support and K' query points per task.
"""

from __future__ import annotations

import math

import torch

from lit_meta.episode import Episode

from .episodic import EpisodicDataModule, require_positive


class SinusoidTasks:
    """Draws sinusoid tasks from a generator: x/y of shape ``[t, k, 1]`` float32."""

    def __init__(self, k_shot: int, k_query: int, amplitude: tuple[float, float] = (0.1, 5.0),
                 phase: tuple[float, float] = (0.0, math.pi), x_range: tuple[float, float] = (-5.0, 5.0)) -> None:
        self.k_shot, self.k_query = k_shot, k_query
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    @staticmethod
    def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
        low, high = bounds
        return torch.rand(shape, generator=generator) * (high - low) + low

    def __call__(self, generator: torch.Generator, n_tasks: int, tasks: slice) -> Episode:
        amplitude = self._uniform((n_tasks, 1, 1), self.amplitude, generator)[tasks]
        phase = self._uniform((n_tasks, 1, 1), self.phase, generator)[tasks]
        x = self._uniform((n_tasks, self.k_shot + self.k_query, 1), self.x_range, generator)[tasks]
        y = amplitude * torch.sin(x - phase)
        k = self.k_shot
        return Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


class SinusoidDataModule(EpisodicDataModule):
    """MAML's sinusoid regression episodes.

    Args:
        k_shot: support points per task. Default 10.
        k_query: query points per task. Default 10.
        amplitude: (low, high) of the uniform amplitude. Default (0.1, 5.0).
        phase: (low, high) of the uniform phase in radians. Default (0, pi).
        x_range: (low, high) of the uniform inputs. Default (-5, 5).
        **kwargs: see :class:`~lit_meta.datamodules.EpisodicDataModule` (default meta_batch_size 25, as MAML).
    """

    def __init__(self, k_shot: int = 10, k_query: int = 10, amplitude: tuple[float, float] = (0.1, 5.0),
                 phase: tuple[float, float] = (0.0, math.pi), x_range: tuple[float, float] = (-5.0, 5.0),
                 meta_batch_size: int = 25, **kwargs) -> None:
        super().__init__(meta_batch_size=meta_batch_size, **kwargs)
        require_positive(k_shot=k_shot, k_query=k_query)
        for name, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not low <= high:
                raise ValueError(f"{name}={(low, high)} must be (low, high) with low <= high")
        self.k_shot, self.k_query = k_shot, k_query
        self.source = SinusoidTasks(k_shot, k_query, tuple(amplitude), tuple(phase), tuple(x_range))

    def task_source(self, split: str) -> SinusoidTasks:
        return self.source
