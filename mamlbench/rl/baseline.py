"""Returns, the linear feature baseline and advantages, for all tasks of a meta-batch at once.

Episodes are padded to the horizon: tensors are (tasks, episodes, horizon, ...) with a `mask` that
is 1 on steps that happened. The baseline is refit per task on that task's own episodes (a
batched least-squares solve over the tasks dimension), as in rllab's `LinearFeatureBaseline`:
features [s, s^2, t, t^2, t^3, 1] with s clipped to [-10, 10] and t the step index / 100.

References: Duan et al., "Benchmarking Deep RL for Continuous Control", ICML 2016 (the linear
feature baseline); Schulman et al., "High-Dimensional Continuous Control Using GAE", ICLR 2016.
"""
from __future__ import annotations

import torch
from torch import Tensor


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """R_t = sum_k gamma^k r_{t+k} within each episode; rewards, mask: (..., horizon)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[..., t] + gamma * running * mask[..., t]
        returns[..., t] = running
    return returns * mask


def features(obs: Tensor, mask: Tensor) -> Tensor:
    """(..., horizon, 2 * obs_dim + 4) features of rllab's linear baseline."""
    s = obs.clamp(-10, 10)
    t = torch.arange(obs.shape[-2], dtype=obs.dtype).expand(mask.shape).unsqueeze(-1) / 100.0
    ones = torch.ones_like(t)
    return torch.cat([s, s * s, t, t * t, t ** 3, ones], -1) * mask.unsqueeze(-1)


def fit_linear_baseline(obs: Tensor, returns: Tensor, mask: Tensor, reg: float = 1e-5) -> Tensor:
    """Per-task ridge regression of returns on features; the fitted values V(s_t), same shape as returns.

    obs (tasks, episodes, horizon, obs_dim); returns and mask (tasks, episodes, horizon).
    The ridge coefficient grows tenfold until the solve is finite, as in rllab.
    """
    T = obs.shape[0]
    x = features(obs, mask).reshape(T, -1, 2 * obs.shape[-1] + 4).double()    # (T, N*H, F)
    y = (returns * mask).reshape(T, -1, 1).double()                            # (T, N*H, 1)
    xtx, xty = x.transpose(1, 2) @ x, x.transpose(1, 2) @ y
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    for _ in range(5):
        w = torch.linalg.solve(xtx + reg * eye, xty)
        if torch.isfinite(w).all():
            break
        reg *= 10
    return (x @ w).reshape(returns.shape).to(returns.dtype) * mask


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimates; lam = 1 gives R_t - V(s_t), the paper's setting."""
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    next_value = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        m = mask[..., t]
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        running = (delta + gamma * lam * running) * m
        adv[..., t] = running
        next_value = values[..., t] * m
    return adv


def advantages(obs: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float,
               baseline: bool = True, normalize: bool = True) -> Tensor:
    """Advantages of every step, baseline refit per task; normalised per task to mean 0, std 1."""
    returns = discounted_returns(rewards, mask, gamma)
    values = fit_linear_baseline(obs, returns, mask) if baseline else torch.zeros_like(returns)
    adv = gae(rewards, values, mask, gamma, lam)
    if normalize:
        dims = tuple(range(1, adv.dim()))
        n = mask.sum(dims, keepdim=True).clamp_min(1)
        mean = adv.sum(dims, keepdim=True) / n
        var = ((adv - mean) ** 2 * mask).sum(dims, keepdim=True) / n
        adv = (adv - mean) / (var.sqrt() + 1e-8) * mask
    return adv
