"""Gaussian MLP policy: mean from a ReLU MLP, a state-independent learned log-std.

`forward` returns `(mean, log_std)` so that `core.forward(policy, params, buffers, obs)` gives the
distribution under any (adapted) parameters; `log_prob` and `kl` are written out for a diagonal
Gaussian instead of going through `torch.distributions`, whose argument checks cost more than the
arithmetic on these small batches.

`batched_forward` evaluates one parameter set per task on that task's observations with
`torch.func.vmap`, so the sampler runs every task of a meta-batch, each under its own adapted
policy, in one call per time step.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mamlbench.algorithms.core import Params, forward

LOG_2PI = math.log(2 * math.pi)
MIN_STD = 1e-6   # rllab's floor on the std (maml_minimal_gauss_mlp_policy.py:38, applied at :265-266)


class GaussianMLPPolicy(nn.Module):
    """pi(a|s) = N(mu(s), diag(max(exp(log_std), MIN_STD))^2), mu an MLP of `hidden` ReLU layers
    (paper: 100, 100).

    Initialised as rllab's: Xavier-uniform weights, zero biases (sandbox/rocky/tf/core/utils.py:38),
    std 1 (maml_minimal_gauss_mlp_policy.py:34). PyTorch's default Linear init is narrower
    (U(+-1/sqrt(fan_in))) and has non-zero biases.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int] = (100, 100), init_std: float = 1.0):
        super().__init__()
        layers, width = [], obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, act_dim))
        for layer in layers:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.mu = nn.Sequential(*layers)
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(init_std)))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.mu(obs)                                   # (..., act_dim)
        return mean, self.log_std.clamp_min(math.log(MIN_STD)).expand_as(mean)


def log_prob(mean: Tensor, log_std: Tensor, action: Tensor) -> Tensor:
    """log pi(a|s) of a diagonal Gaussian, summed over the action dimensions."""
    z = (action - mean) * torch.exp(-log_std)
    return -(0.5 * z.pow(2) + log_std + 0.5 * LOG_2PI).sum(-1)


def kl(mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor) -> Tensor:
    """KL(p || q) of two diagonal Gaussians, summed over the action dimensions."""
    var_p, var_q = torch.exp(2 * log_std_p), torch.exp(2 * log_std_q)
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q).pow(2)) / (2 * var_q) - 0.5).sum(-1)


def stack_params(per_task: list[Params]) -> Params:
    """A list of parameter dicts as one dict of (tasks, ...) tensors."""
    return {k: torch.stack([p[k] for p in per_task]) for k in per_task[0]}


def batched_forward(policy: nn.Module, params: Params, buffers: Params, obs: Tensor,
                    per_task: bool) -> tuple[Tensor, Tensor]:
    """(mean, log_std) for obs (tasks, n, obs_dim): one shared parameter set, or one per task
    (`per_task`: every tensor of `params` has a leading tasks dimension)."""
    if not per_task:
        return forward(policy, params, buffers, obs)
    return torch.func.vmap(lambda p, x: forward(policy, p, buffers, x))(params, obs)
