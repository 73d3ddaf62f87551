"""The pieces of a TRPO step, on parameter dicts: conjugate gradient, Fisher-vector products, line search.

The meta-update of MAML-TRPO is an ordinary TRPO step whose surrogate and KL are functions of the
*initial* parameters through the inner update; nothing here knows that. `fisher_vector_product`
differentiates the KL twice with autograd, so when the KL was computed through a second-order inner
update, the Hessian-vector products go through the inner update too.

References: Schulman et al., "Trust Region Policy Optimization", ICML 2015 (appendix C).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mamlbench.algorithms.core import Params


def flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: Tensor, like: Params) -> Params:
    out, i = {}, 0
    for k, p in like.items():
        out[k] = vector[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


def conjugate_gradient(Av: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10,
                       residual_tol: float = 1e-10) -> Tensor:
    """Approximately solve A x = b for symmetric positive-definite A given only x -> A x."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        Ap = Av(p)
        alpha = rr / (p @ Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = r @ r
        if rr_new < residual_tol:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def fisher_vector_product(kl: Tensor, params: Params, damping: float) -> Callable[[Tensor], Tensor]:
    """v -> (H_KL + damping I) v, H_KL the Hessian of `kl` w.r.t. `params` at the current point.

    The KL's gradient is built once with `create_graph` (its value is ~0 at the old policy, its
    Jacobian is what matters); each product is one more backward through it.
    """
    leaves = list(params.values())
    grad_kl = flat(torch.autograd.grad(kl, leaves, create_graph=True))

    def product(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(grad_kl @ v, leaves, retain_graph=True)
        return flat(hv) + damping * v
    return product


def natural_step(g: Tensor, Fv: Callable[[Tensor], Tensor], max_kl: float, cg_iters: int = 10) -> Tensor:
    """The full TRPO step -beta F^-1 g, beta such that the KL's quadratic model 0.5 s'Fs is max_kl.

    As rllab's conjugate_gradient_optimizer.py:268-272 (sqrt(2 max_kl / s'Fs)) and
    pytorch-maml-rl's maml_trpo.py:147-151 (shs = 0.5 s'Fs, step = s / sqrt(shs / max_kl)).
    """
    step_dir = conjugate_gradient(Fv, -g, cg_iters)                 # ~ -F^-1 g
    sFs = step_dir @ Fv(step_dir)
    return step_dir * torch.sqrt(2 * max_kl / sFs.clamp_min(1e-12))


def line_search(evaluate: Callable[[Tensor], tuple[float, float]], full_step: Tensor, max_kl: float,
                max_steps: int = 15, backtrack_ratio: float = 0.8) -> tuple[Tensor | None, float, float, int]:
    """Backtrack from `full_step` until the surrogate loss improves and the KL is within `max_kl`.

    Trial i is `full_step * backtrack_ratio ** i`, i < max_steps (rllab: 0.8 and 15,
    conjugate_gradient_optimizer.py:130-131, 280-290).

    `evaluate(step)` returns (loss improvement = new loss - old loss, mean KL) at params + step.
    Returns (accepted step or None, improvement, kl, backtracks); None means keep the old params.
    """
    improvement, kl = float("nan"), float("nan")
    for i in range(max_steps):
        step = full_step * backtrack_ratio ** i
        improvement, kl = evaluate(step)
        if improvement < 0 and kl <= max_kl:
            return step, improvement, kl, i
    return None, improvement, kl, max_steps
