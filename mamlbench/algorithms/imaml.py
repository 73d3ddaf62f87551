"""iMAML (implicit MAML): the meta-gradient of a proximal inner problem, by implicit differentiation.

The inner problem is regularised towards the initialisation (Rajeswaran et al., section 3):

    phi*(theta) = argmin_phi  L_support(phi) + lam/2 ||phi - theta||^2,

solved approximately by `inner_steps` gradient steps from phi = theta. At its minimum,
grad L_support(phi*) + lam (phi* - theta) = 0, so d phi*/d theta = (I + H/lam)^-1 with H the
Hessian of L_support at phi* (Lemma 1), and the meta-gradient of L_query(phi*) is

    g = (I + H/lam)^-1 grad L_query(phi*),

found by `cg_steps` of conjugate gradient on (I + H/lam) g = grad L_query(phi*), each needing one
Hessian-vector product (Algorithm 2). Nothing of the inner loop is differentiated: its steps keep
no graph, so memory does not grow with `inner_steps`, unlike MAML's (the paper's point).

Parameters the inner loop does not adapt (BatchNorm's with `adapt_norm: false`) receive their
direct query gradient only; the theory (and the reference code) adapts every parameter.

References: Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients",
NeurIPS 2019; github.com/aravindr93/imaml_dev (examples/omniglot_implicit_maml.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamlbench.algorithms.core import LR, Params, detached_surrogate, forward, split_state, task_batch_norm
from mamlbench.algorithms.maml import MAML, MetaOutput
from mamlbench.schema import knob


@dataclass(frozen=True)
class IMAMLParams:
    """The `imaml` section: what iMAML adds to MAML."""
    lam: float = knob(2.0, "Proximal regularisation lambda of the inner problem (the reference's --lam 2.0).", gt=0)
    cg_steps: int = knob(5, "Conjugate-gradient iterations for the implicit meta-gradient (--cg_steps 5).", ge=1)
    eval_lam: float | None = knob(None, "lambda of the inner problem at evaluation (eval mode); null: `lam`. The "
                                        "reference's measure_accuracy.py command uses 0: plain fine-tuning.", ge=0)


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    """a / b, and 0 where b = 0 (an exact solution leaves r = 0, hence 0 / 0), without a data-dependent branch."""
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """x ~ A^-1 b for symmetric positive definite A, from x = 0, a fixed number of steps (so it runs under vmap)."""
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r, p = dict(b), dict(b)
    rr = _dot(r, r)
    for _ in range(steps):
        ap = matvec(p)
        alpha = _safe_div(rr, _dot(p, ap))
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_new = _dot(r, r)
        p = {k: r[k] + _safe_div(rr_new, rr) * p[k] for k in p}
        rr = rr_new
    return x


class IMAML(MAML):
    """Implicit MAML around `model`.

    Args:
        model, strategy, loss_fn: as `MAML`.
        inner_lr, inner_steps: gradient descent on the proximal inner problem.
        lam, cg_steps, eval_lam: see `IMAMLParams`.

    References: Rajeswaran et al., NeurIPS 2019 (Lemma 1, Algorithm 2).

    Example:
        learner = IMAML(model, inner_lr=0.1, inner_steps=16, lam=2.0, cg_steps=5)
        out = learner(support_x, support_y, query_x, query_y)
        opt.zero_grad(); out.loss.backward(); opt.step()     # .grad holds the implicit meta-gradient
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 16, strategy: str = "auto",
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy, lam: float = 2.0, cg_steps: int = 5,
                 eval_lam: float | None = None):
        super().__init__(model, inner_lr, inner_steps, first_order=True, strategy=strategy, loss_fn=loss_fn)
        self.lam, self.cg_steps, self.eval_lam = lam, cg_steps, eval_lam

    def steps(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor, n_steps: int, *,
              batched: bool = True, first_order: bool = True, inner_lr: LR | None = None) -> Iterator[Params]:
        """phi_0 = theta, ..., phi_n: gradient descent on L_support(phi) + lam/2 ||phi - theta||^2, never differentiated."""
        lam = self.lam if self.training or self.eval_lam is None else self.eval_lam
        lr = self.inner_lr if inner_lr is None else inner_lr
        theta = {k: v.detach() for k, v in params.items() if self.adapts(k)}
        support_loss = self.support_loss(params, buffers, support_x, support_y)
        phi = dict(theta)
        yield params
        for _ in range(n_steps):
            grads = torch.func.grad(support_loss)(phi)
            phi = {k: phi[k] - lr * (grads[k] + lam * (phi[k] - theta[k])) for k in phi}
            yield {**params, **phi}

    def task_meta_grads(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor,
                        query_x: Tensor, query_y: Tensor) -> tuple[Params, Tensor, Tensor]:
        """One task: (meta-gradient per parameter, query loss, query outputs), all detached."""
        for adapted in self.steps(params, buffers, support_x, support_y, self.inner_steps):
            pass
        phi = {k: v for k, v in adapted.items() if self.adapts(k)}
        rest = {k: v for k, v in adapted.items() if not self.adapts(k)}

        def query_loss(fast: Params, others: Params):
            out = forward(self.model, {**others, **fast}, buffers, query_x)
            return self.loss_fn(out, query_y), out
        (g_phi, g_rest), (loss, out) = torch.func.grad_and_value(query_loss, argnums=(0, 1), has_aux=True)(phi, rest)
        support_loss = self.support_loss(adapted, buffers, support_x, support_y)

        def hvp(v: Params) -> Params:  # H v: the gradient of <grad L_support(phi), v> (reverse over reverse)
            return torch.func.grad(lambda p: _dot(torch.func.grad(support_loss)(p), v))(phi)
        g = conjugate_gradient(lambda v: {k: v[k] + hv / self.lam for k, hv in hvp(v).items()}, g_phi,
                               self.cg_steps)
        return {**g_rest, **g}, loss, out

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> MetaOutput:
        """Mean query loss over tasks; `loss.backward()` puts the mean implicit meta-gradient into `.grad`."""
        params, buffers = split_state(self.model)
        theta = {k: v.detach() for k, v in params.items()}

        def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
            return self.task_meta_grads(theta, buffers, sx, sy, qx, qy)

        batched = self.resolve_strategy(support_x.device) in ("vmap", "compiled")
        with task_batch_norm(self.model, batched=batched):
            if batched:
                grads, losses, outs = torch.func.vmap(one, randomness="different")(support_x, support_y, query_x,
                                                                                   query_y)
            else:
                per_task = [one(*t) for t in zip(support_x, support_y, query_x, query_y)]
                grads = {k: torch.stack([g[k] for g, _, _ in per_task]) for k in theta}
                losses, outs = torch.stack([l for _, l, _ in per_task]), torch.stack([o for _, _, o in per_task])
        value = losses.mean()
        if not torch.is_grad_enabled():
            return MetaOutput(value, losses, outs)
        leaves = list(params.values())
        return MetaOutput(detached_surrogate(value, leaves, [grads[k].mean(0) for k in params]), losses, outs)
