"""Sinusoid regression tasks, exactly the distribution of Finn et al. 2017, section 5.1.

A task is y = A sin(x - phi) with amplitude A ~ U[0.1, 5.0], phase phi ~ U[0, pi], inputs x ~ U[-5, 5].
Every draw takes an explicit `torch.Generator`, so (seed, iteration) fixes the tasks of a
meta-batch and the test set is the same for every model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


@dataclass
class SinusoidTasks:
    amplitude: Tensor  # (tasks,)
    phase: Tensor      # (tasks,)

    def __len__(self) -> int:
        return self.amplitude.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        """y for inputs x of shape (tasks, points, 1)."""
        return self.amplitude[:, None, None] * torch.sin(x - self.phase[:, None, None])


def _uniform(shape, bounds, generator) -> Tensor:
    low, high = bounds
    return torch.rand(shape, generator=generator) * (high - low) + low


def sample_tasks(n: int, generator: torch.Generator) -> SinusoidTasks:
    return SinusoidTasks(_uniform((n,), AMPLITUDE, generator), _uniform((n,), PHASE, generator))


def sample_points(tasks: SinusoidTasks, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """k points of each task: x, y of shape (tasks, k, 1)."""
    x = _uniform((len(tasks), k, 1), X_RANGE, generator)
    return x, tasks(x)


def task_batch(n_tasks: int, k_shot: int, k_query: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    """A meta-batch: support_x, support_y (tasks, k_shot, 1), query_x, query_y (tasks, k_query, 1)."""
    tasks = sample_tasks(n_tasks, generator)
    support_x, support_y = sample_points(tasks, k_shot, generator)
    query_x, query_y = sample_points(tasks, k_query, generator)
    return support_x, support_y, query_x, query_y


def fixed_test_tasks(n_tasks: int, max_k: int, n_query: int, seed: int) -> tuple[SinusoidTasks, Tensor, Tensor, Tensor, Tensor]:
    """The fixed evaluation set: tasks, support (up to max_k points, use the first K), query points.

    A K-shot evaluation uses support[:, :K], so the K=5 points are a subset of the K=10 points and
    every model sees the same data.
    """
    generator = torch.Generator().manual_seed(seed)
    tasks = sample_tasks(n_tasks, generator)
    support_x, support_y = sample_points(tasks, max_k, generator)
    query_x, query_y = sample_points(tasks, n_query, generator)
    return tasks, support_x, support_y, query_x, query_y
