"""MAML with its inner loop exposed one step at a time: the hook the variants override.

`MAML.adapt` runs the whole inner loop at once and `MAML.trajectory` re-implements it for
evaluation, so a variant that changes the inner step (ANIL: head only; MAML++: per-step learning
rates and BatchNorm; Reptile: Adam on minibatches) would have to override both. Here both are
written over one generator, `steps`, that yields the parameters after 0, 1, ..., n inner steps;
a variant overrides `steps` (and `inner_lr_at` for per-step learning rates) only.

This is a stand-in for a hook proposed for `maml.py`; once `MAML` has it, the variants subclass
`MAML` directly and this file goes.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

from mamlbench.algorithms.core import (
    LR, Params, forward, inner_grads, sgd_step, split_state, task_batch_norm,
)
from mamlbench.algorithms.maml import MAML


class StepwiseMAML(MAML):
    """`MAML` whose `adapt` and `trajectory` both run the generator `steps` (same Args as `MAML`)."""

    def inner_lr_at(self, step: int) -> LR:
        """Step size(s) of inner step `step` (0-based); constant over the steps here."""
        return self.inner_lrs()

    def steps(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor, n_steps: int, *,
              batched: bool, first_order: bool, inner_lr: LR | None = None) -> Iterator[Params]:
        """Yield theta_0 = params, theta_1, ..., theta_n: SGD on the support loss.

        `batched` selects `torch.func.grad` (under vmap, or without autograd's grad mode) over
        `torch.autograd.grad`; `inner_lr`, when given, replaces the learned or scheduled rates.
        """
        def support_loss(p: Params) -> Tensor:
            return self.loss_fn(forward(self.model, p, buffers, support_x), support_y)

        yield params
        for s in range(n_steps):
            grads, _ = inner_grads(support_loss, params, first_order=first_order, batched=batched)
            params = sgd_step(params, grads, self.inner_lr_at(s) if inner_lr is None else inner_lr)
            yield params

    def adapt(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor,
              inner_steps: int, batched: bool) -> Params:
        for params in self.steps(params, buffers, support_x, support_y, inner_steps,
                                 batched=batched, first_order=self.first_order):
            pass
        return params

    @torch.no_grad()
    def trajectory(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                   inner_steps: int, metric: Callable[[Tensor, Tensor], Tensor] | None = None,
                   inner_lr: LR | None = None) -> Tensor:
        """Query metric (default: the loss) of each task after 0..inner_steps steps: (tasks, steps+1).

        Evaluation only: first order through `torch.func.grad`, which needs no autograd graph, so
        nothing is kept between steps (memory flat in the steps).
        """
        metric = metric or self.loss_fn
        params, buffers = split_state(self.model)
        params = {k: v.detach() for k, v in params.items()}

        def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            return torch.stack([metric(forward(self.model, p, buffers, qx), qy)
                                for p in self.steps(params, buffers, sx, sy, inner_steps, batched=True,
                                                    first_order=True, inner_lr=inner_lr)])

        batched = self.resolve_strategy(support_x.device) == "vmap"
        with task_batch_norm(self.model, batched=batched):
            if batched:
                return torch.func.vmap(one, randomness="different")(support_x, support_y, query_x, query_y)
            return torch.stack([one(*task) for task in zip(support_x, support_y, query_x, query_y)])
