"""Reptile: move the initialisation towards the weights each task's training reaches.

For each task t, run k steps of SGD (or Adam) on its data from theta to phi_t; then
theta <- theta + epsilon (mean_t phi_t - theta). No second derivatives and no query set: the query
set only scores the adapted weights for monitoring.

To plug into the same training loop as MAML, `forward` returns a `MetaOutput` whose `loss` has the
value of the mean query loss after adaptation but whose gradient w.r.t. theta is
(theta - mean_t phi_t). Then `loss.backward(); opt.step()` with `torch.optim.SGD(lr=epsilon)` is
exactly the Reptile update, and with Adam it is the paper's "Reptile gradient fed to Adam" variant
(Nichol et al., section 3). Nichol et al. anneal epsilon linearly to 0: `meta_lr` gives it.

References: Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms",
arXiv:1803.02999, 2018 (Algorithm 2, batched version), and github.com/openai/supervised-reptile.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamlbench.algorithms.core import (
    LR, Params, detached_surrogate, forward, inner_grads, sgd_step, split_state, task_batch_norm,
)
from mamlbench.algorithms.maml import MAML, MetaOutput
from mamlbench.schema import ConfigError, knob


@dataclass(frozen=True)
class ReptileParams:
    """The `reptile` section: the inner optimiser and the outer step size epsilon."""
    inner_optimizer: Literal["sgd", "adam"] = knob("sgd", "Inner optimiser on each task; the paper: adam "
                                                          "(inner_lr 0.001, betas 0, 0.999).")
    inner_batch_size: int | None = knob(None, "Support examples per inner step, cycling through a shuffled "
                                              "support set; null: the whole support set.", ge=1)
    adam_betas: list[float] = knob([0.0, 0.999], "Inner Adam's betas (the paper: beta1 = 0).", ge=0, lt=1)
    meta_optimizer: Literal["sgd", "adam"] = knob("sgd", "Outer optimiser: sgd with lr epsilon is Reptile as "
                                                         "defined; adam treats theta - phi as a gradient.")
    final_meta_lr: float | None = knob(0.0, "Anneal epsilon linearly from the meta lr to this; null: constant.", ge=0)

    def validate(self, where: str = "") -> None:
        if len(self.adam_betas) != 2:
            raise ConfigError(f"{where + '.' if where else ''}adam_betas = {self.adam_betas!r}: expected two numbers")


class Reptile(MAML):
    """Reptile around `model` (meta-update through `loss.backward()`, see the module docstring).

    Args:
        model, strategy, loss_fn: as `MAML`.
        inner_lr: step size of the inner optimiser.
        inner_steps: inner steps k per task in meta-training.
        inner_optimizer: "sgd" or "adam" (state fresh for each task, so tasks stay independent;
            the reference code kept Adam's moments across tasks).
        inner_batch_size: support examples per step; None: all of them.
        adam_betas: the inner Adam's (beta1, beta2).
        meta_optimizer, final_meta_lr: read by the training loop (`meta_lr`).

    References: Nichol et al., 2018.

    Example:
        learner = Reptile(model, inner_lr=0.001, inner_steps=5, inner_optimizer="adam")
        opt = torch.optim.SGD(learner.parameters(), lr=1.0)          # lr is epsilon
        out = learner(support_x, support_y, query_x, query_y)
        opt.zero_grad(); out.loss.backward(); opt.step()             # theta += eps (mean phi - theta)
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.001, inner_steps: int = 5, strategy: str = "auto",
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy, *,
                 inner_optimizer: str = "sgd", inner_batch_size: int | None = None,
                 adam_betas: tuple[float, float] | list[float] = (0.0, 0.999), meta_optimizer: str = "sgd",
                 final_meta_lr: float | None = 0.0):
        super().__init__(model, inner_lr, inner_steps, first_order=True, strategy=strategy, loss_fn=loss_fn)
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"inner_optimizer must be sgd or adam, got {inner_optimizer!r}")
        self.inner_optimizer, self.inner_batch_size = inner_optimizer, inner_batch_size
        self.adam_betas, self.adam_eps = tuple(adam_betas), 1e-8
        self.meta_optimizer, self.final_meta_lr = meta_optimizer, final_meta_lr
        # Draws the minibatch shuffles when inner_batch_size is set; None: the global RNG. For a
        # bit-exact resume the training loop sets a per-iteration one (`mamlbench.rng.generator`).
        self.generator: torch.Generator | None = None

    def meta_lr(self, iteration: int, total_iterations: int, base_lr: float) -> float:
        """epsilon at `iteration`: linear from `base_lr` to `final_meta_lr` (Nichol et al.)."""
        if self.final_meta_lr is None:
            return base_lr
        frac = min(iteration / max(total_iterations, 1), 1.0)
        return (1 - frac) * base_lr + frac * self.final_meta_lr

    def steps(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor, n_steps: int, *,
              batched: bool, first_order: bool, inner_lr: LR | None = None,
              order: Tensor | None = None) -> Iterator[Params]:
        """phi_0 = theta, ..., phi_k; `order` (n_support,) is the permutation minibatches cycle through."""
        lr = self.inner_lr if inner_lr is None else inner_lr
        n_support = support_x.shape[0]
        batch = self.inner_batch_size if self.inner_batch_size and self.inner_batch_size < n_support else None
        if batch is not None and order is None:
            order = torch.arange(n_support, device=support_x.device)
        b1, b2 = self.adam_betas
        m = {k: torch.zeros_like(v) for k, v in params.items()}
        v2 = {k: torch.zeros_like(v) for k, v in params.items()}

        yield params
        for s in range(n_steps):
            x, y = support_x, support_y
            if batch is not None:
                idx = order[(s * batch + torch.arange(batch, device=order.device)) % n_support]
                x, y = support_x[idx], support_y[idx]

            def loss(p: Params, x=x, y=y) -> Tensor:
                return self.loss_fn(forward(self.model, p, buffers, x), y)
            # Reptile never differentiates through the inner loop: torch.func.grad, no graph kept.
            grads, _ = inner_grads(loss, params, first_order=True, batched=True)
            if self.inner_optimizer == "sgd":
                params = sgd_step(params, grads, lr)
            else:
                t = s + 1
                m = {k: b1 * m[k] + (1 - b1) * g for k, g in grads.items()}
                v2 = {k: b2 * v2[k] + (1 - b2) * g * g for k, g in grads.items()}
                params = {k: p - lr * (m[k] / (1 - b1 ** t)) / ((v2[k] / (1 - b2 ** t)).sqrt() + self.adam_eps)
                          for k, p in params.items()}
            yield params

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> MetaOutput:
        """Adapt to every task; `loss.backward()` puts theta - mean_t phi_t into the parameters' `.grad`."""
        params, buffers = split_state(self.model)
        theta = {k: v.detach() for k, v in params.items()}
        n_tasks, n_support = support_x.shape[:2]
        # (tasks, n_support): one shuffle per task, drawn here so vmap and loop see the same batches.
        orders = None
        if self.inner_batch_size and self.inner_batch_size < n_support:
            orders = torch.rand(n_tasks, n_support, generator=self.generator).argsort(-1).to(support_x.device)

        def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, order: Tensor | None):
            for phi in self.steps(theta, buffers, sx, sy, self.inner_steps, batched=True, first_order=True,
                                  order=order):
                pass
            out = forward(self.model, phi, buffers, qx)
            return phi, self.loss_fn(out, qy), out

        batched = self.resolve_strategy(support_x.device) == "vmap"
        with torch.no_grad(), task_batch_norm(self.model, batched=batched):
            if batched:
                in_dims = (0, 0, 0, 0, None if orders is None else 0)
                phis, losses, outs = torch.func.vmap(one, in_dims=in_dims, randomness="different")(
                    support_x, support_y, query_x, query_y, orders)
                mean_phi = {k: v.mean(0) for k, v in phis.items()}
            else:
                # Running sum instead of a stack: memory of one extra copy of the weights.
                mean_phi = {k: torch.zeros_like(v) for k, v in theta.items()}
                losses, outs = [], []
                for t in range(n_tasks):
                    phi, loss, out = one(support_x[t], support_y[t], query_x[t], query_y[t],
                                         None if orders is None else orders[t])
                    for k in mean_phi:
                        mean_phi[k] += phi[k] / n_tasks
                    losses.append(loss)
                    outs.append(out)
                losses, outs = torch.stack(losses), torch.stack(outs)
        value = losses.mean()
        if not torch.is_grad_enabled():
            return MetaOutput(value, losses, outs)
        leaves = list(params.values())
        reptile_grads = [theta[k] - mean_phi[k] for k in params]
        return MetaOutput(detached_surrogate(value, leaves, reptile_grads), losses, outs)
