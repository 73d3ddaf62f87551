"""MAML-TRPO: a REINFORCE inner update per task, a TRPO meta-update on the post-update returns.

One meta-iteration (`meta_step`), in the paper's order (Finn et al. 2017, algorithm 3):
  1. sample tasks T_i; roll out the policy pi_theta on each ("train" episodes, D_i);
  2. inner update per task: theta'_i = theta - alpha grad L_REINFORCE(theta; D_i), advantages from a
     linear baseline refit on D_i (`core.inner_loop`: second order keeps the graph of the gradient);
  3. roll out every pi_theta'_i ("valid" episodes, D'_i), all tasks in one vector env;
  4. TRPO on theta: surrogate sum_i E_{D'_i}[pi_theta'_i / pi_old'_i * A] and KL(pi_old'_i || pi_theta'_i),
     both functions of theta *through* the inner update; conjugate gradient with Fisher-vector
     products, step scaled to a quadratic KL of max_kl, backtracking line search that re-adapts at every trial.

`inner_steps = 0` skips 2-3: plain TRPO on the mixture of tasks, i.e. the paper's "pretrained" baseline.

References: Finn, Abbeel & Levine, ICML 2017 (MAML-TRPO); Schulman et al., ICML 2015 (TRPO);
tristandeleu/pytorch-maml-rl (a PyTorch reproduction the update follows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mamlbench.algorithms.core import Params, forward, inner_loop, split_state
from mamlbench.rl.baseline import advantages
from mamlbench.rl.policy import kl as gaussian_kl, log_prob, stack_params
from mamlbench.rl.sampler import Episodes, Sampler
from mamlbench.rl.trpo import fisher_vector_product, flat, line_search, natural_step, unflat


@dataclass(frozen=True)
class MetaConfig:
    """The knobs of one meta-iteration (a subset of `RLEnvParams`, see there for the docs)."""
    inner_lr: float = 0.1
    inner_steps: int = 1
    n_episodes: int = 20
    first_order: bool = False
    gamma: float = 0.99
    gae_lambda: float = 1.0
    max_kl: float = 0.01
    cg_iters: int = 10
    cg_damping: float = 1e-5
    ls_max_steps: int = 15
    ls_backtrack_ratio: float = 0.8


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def reinforce_loss(policy: nn.Module, params: Params, buffers: Params, obs: Tensor, actions: Tensor,
                   adv: Tensor, mask: Tensor) -> Tensor:
    """-E[log pi(a|s) A]: the vanilla policy gradient loss of one task's episodes."""
    mean, log_std = forward(policy, params, buffers, obs)
    return -masked_mean(log_prob(mean, log_std, actions) * adv, mask)


def adapt(policy: nn.Module, params: Params, buffers: Params, episodes: list[Episodes],
          advs: list[Tensor], task: int, inner_lr: float | list[float], first_order: bool) -> Params:
    """theta'_i: one REINFORCE step per entry of `episodes` (each sampled under the previous step's
    policy), on task `task`; differentiable w.r.t. `params` (second order unless `first_order`)."""
    lrs = inner_lr if isinstance(inner_lr, list) else [inner_lr] * len(episodes)
    for eps, adv, lr in zip(episodes, advs, lrs):
        def loss_fn(p: Params, eps=eps, adv=adv) -> Tensor:
            return reinforce_loss(policy, p, buffers, eps.obs[task], eps.actions[task], adv[task], eps.mask[task])
        params = inner_loop(loss_fn, params, lr, 1, first_order=first_order)
    return params


def episode_advantages(eps: Episodes, cfg: MetaConfig) -> Tensor:
    return advantages(eps.obs, eps.rewards, eps.mask, cfg.gamma, cfg.gae_lambda)


def collect(policy: nn.Module, sampler: Sampler, tasks: list, cfg: MetaConfig, seed: tuple
            ) -> tuple[list[Episodes], list[Tensor], Episodes, Tensor]:
    """Steps 1-3: train episodes for each inner step, then valid episodes of the adapted policies."""
    params, buffers = split_state(policy)
    params = {k: p.detach().requires_grad_() for k, p in params.items()}
    train, train_adv = [], []
    adapted, per_task = params, False
    for step in range(cfg.inner_steps):
        eps = sampler.sample(policy, adapted, buffers, tasks, cfg.n_episodes, (*seed, step), per_task)
        train.append(eps)
        train_adv.append(episode_advantages(eps, cfg))
        # Sampling only needs the adapted parameters' values: first order, no graph kept.
        adapted = stack_params([adapt(policy, params, buffers, train, train_adv, i, cfg.inner_lr, True)
                                for i in range(len(tasks))])
        per_task = True
    valid = sampler.sample(policy, adapted, buffers, tasks, cfg.n_episodes, (*seed, cfg.inner_steps), per_task)
    return train, train_adv, valid, episode_advantages(valid, cfg)


def surrogate(policy: nn.Module, params: Params, buffers: Params, train: list[Episodes],
              train_adv: list[Tensor], valid: Episodes, valid_adv: Tensor, cfg: MetaConfig,
              old: list[tuple[Tensor, Tensor]] | None, first_order: bool
              ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    """(surrogate loss, mean KL(old || new), per-task (mean, log_std) of the adapted policies).

    With `old = None` the current adapted policies are the old ones (ratio 1, KL 0 in value but
    with the right derivatives).
    """
    losses, kls, dists = [], [], []
    for i in range(len(valid.tasks)):
        adapted = adapt(policy, params, buffers, train, train_adv, i, cfg.inner_lr, first_order)
        mean, log_std = forward(policy, adapted, buffers, valid.obs[i])      # (N, H, act_dim)
        old_mean, old_log_std = (mean.detach(), log_std.detach()) if old is None else old[i]
        ratio = torch.exp(log_prob(mean, log_std, valid.actions[i]) - log_prob(old_mean, old_log_std, valid.actions[i]))
        losses.append(-masked_mean(ratio * valid_adv[i], valid.mask[i]))
        kls.append(masked_mean(gaussian_kl(old_mean, old_log_std, mean, log_std), valid.mask[i]))
        dists.append((old_mean, old_log_std))
    return torch.stack(losses).mean(), torch.stack(kls).mean(), dists


def meta_step(policy: nn.Module, sampler: Sampler, tasks: list, cfg: MetaConfig, seed: tuple) -> dict[str, float]:
    """One meta-iteration on `tasks`; updates `policy` in place; returns its metrics."""
    train, train_adv, valid, valid_adv = collect(policy, sampler, tasks, cfg, seed)   # steps 1-3
    metrics = trpo_update(policy, train, train_adv, valid, valid_adv, cfg)            # step 4
    metrics["returns/post_update"] = float(valid.returns.mean())
    metrics["samples/steps"] = float(valid.steps + sum(e.steps for e in train))
    if train:
        metrics["returns/pre_update"] = float(train[0].returns.mean())
    return metrics


def trpo_update(policy: nn.Module, train: list[Episodes], train_adv: list[Tensor], valid: Episodes,
                valid_adv: Tensor, cfg: MetaConfig) -> dict[str, float]:
    """Step 4: one TRPO step on the initial parameters through the inner update; in place."""
    params, buffers = split_state(policy)

    loss, kl, old = surrogate(policy, params, buffers, train, train_adv, valid, valid_adv, cfg, None, cfg.first_order)
    g = flat(torch.autograd.grad(loss, list(params.values()), retain_graph=True))
    Fv = fisher_vector_product(kl, params, cfg.cg_damping)
    full_step = natural_step(g, Fv, cfg.max_kl, cfg.cg_iters)            # 0.5 s'Fs = max_kl
    old_flat = flat(p.detach() for p in params.values())
    old_loss = float(loss.detach())

    def trial(step: Tensor) -> tuple[float, float]:
        # The value of the re-adapted surrogate is all the line search needs: first order is enough.
        new = {k: v.detach().requires_grad_() for k, v in unflat(old_flat + step, params).items()}
        new_loss, new_kl, _ = surrogate(policy, new, buffers, train, train_adv, valid, valid_adv, cfg, old, True)
        return float(new_loss.detach()) - old_loss, float(new_kl.detach())

    step, improvement, new_kl, backtracks = line_search(trial, full_step, cfg.max_kl, cfg.ls_max_steps,
                                                       cfg.ls_backtrack_ratio)
    with torch.no_grad():
        if step is not None:
            for p, v in zip(params.values(), unflat(old_flat + step, params).values()):
                p.copy_(v)

    return {"trpo/surrogate": old_loss, "trpo/improvement": improvement, "trpo/kl": new_kl,
            "trpo/backtracks": float(backtracks), "trpo/accepted": float(step is not None),
            "policy/std": float(policy.log_std.detach().exp().mean())}


def make_policy(obs_dim: int, act_dim: int, hidden: list[int], seed: int) -> nn.Module:
    """The initial policy, a pure function of `seed` (the global RNG is left as it was)."""
    from mamlbench.rl.policy import GaussianMLPPolicy
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GaussianMLPPolicy(obs_dim, act_dim, hidden)


def is_finite(metrics: dict[str, Any]) -> bool:
    return all(not isinstance(v, float) or math.isfinite(v) for v in metrics.values())
