"""MAML (second order) and first-order MAML on any `nn.Module`, tasks batched with `vmap` or looped.

Example:
    maml = MAML(model, inner_lr=0.4, inner_steps=1, loss_fn=F.cross_entropy)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    out = maml(support_x, support_y, query_x, query_y)   # leading dim: tasks
    opt.zero_grad(); out.loss.backward(); opt.step()

References: Finn, Abbeel & Levine, ICML 2017 (MAML and its first-order approximation).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from mamlbench.algorithms.core import (
    LR, Params, choose_strategy, detached_surrogate, forward, inner_grads, sgd_step,
    split_state, task_batch_norm,
)
from mamlbench.algorithms import fast as fast_path  # the compiled strategy

STRATEGIES = ("auto", "vmap", "loop", "compiled")
PRECISIONS = ("fp32", "bf16")


@dataclass
class MetaOutput:
    loss: Tensor          # mean query loss over tasks; .backward() gives the meta-gradient
    task_losses: Tensor   # (tasks,) detached
    query_outputs: Tensor  # (tasks, n_query, ...) detached model outputs on the query sets


class MAML(nn.Module):
    """Model-agnostic meta-learning around `model`.

    Args:
        model: any `nn.Module`; its trainable parameters are the meta-learned initialisation.
        inner_lr: step size alpha of the inner SGD steps.
        inner_steps: inner steps per task in `forward` (meta-training).
        first_order: drop the second-order term (FOMAML): cheaper, usually slightly worse.
        strategy: "vmap" batches tasks; "loop" runs them one by one with a per-task backward (peak
            memory of one task); "compiled" is the task-batched meta-step under `torch.compile`
            (`fast.py`; MAML, ANIL, Meta-SGD); "auto" picks per device and model (`core.choose_strategy`).
        loss_fn: loss(outputs, targets) -> scalar, used on support and query sets.
        checkpointing: recompute each inner step during the backward instead of keeping its
            activations (loop strategy): memory flat in `inner_steps` for about one more forward
            and backward per step, so 20+ second-order steps fit.
        precision: "bf16" runs the inner loop and the query pass under bf16 autocast: activations
            only (autocast casts per op), so the parameters, the inner SGD steps, the losses and
            the meta-gradient stay fp32. The inner loop amplifies bf16 rounding: the conv net's
            meta-gradient is 25-60% off fp32 (sinusoid MLP: <10%), below the meta-batch's own
            sampling noise (tests/test_precision.py states the tolerance); "fp32" changes nothing.
    """

    checkpointing: bool = False
    precision: str = "fp32"
    inner_frozen: frozenset[str] = frozenset()  # meta-learned, but left as they are by the inner loop

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1,
                 first_order: bool = False, strategy: str = "auto",
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy, checkpointing: bool = False,
                 precision: str = "fp32"):
        super().__init__()
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be {', '.join(STRATEGIES)}, got {strategy!r}")
        if strategy == "compiled" and (reason := fast_path.unsupported(self)):
            raise ValueError(f"strategy 'compiled': {reason}")
        self.model, self.inner_lr, self.inner_steps = model, inner_lr, inner_steps
        self.first_order, self.strategy, self.loss_fn = first_order, strategy, loss_fn
        self.checkpointing = checkpointing
        self.precision = check_precision(precision)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bf16 autocast when `precision` is bf16, else nothing.

        Autocast runs cross_entropy and mse_loss in fp32 and leaves elementwise ops (the SGD step)
        on their fp32 inputs, so only matmul/conv activations drop to bf16.
        """
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def __call__(self, support_x: Tensor, *args, **kwargs):
        """`forward` under `autocast`: whatever the strategy, and for variants that override `forward`."""
        with self.autocast(support_x.device):
            return super().__call__(support_x, *args, **kwargs)

    # ---- what a variant may override -------------------------------------------------------
    def inner_lrs(self) -> LR:
        """Step size(s) of the inner loop: a float here, learned tensors in Meta-SGD."""
        return self.inner_lr

    def inner_lr_at(self, step: int) -> LR:
        """Step size(s) of inner step `step` (0-based): per-step rates in MAML++."""
        return self.inner_lrs()

    def adapts(self, name: str) -> bool:
        """Whether the inner loop adapts parameter `name`: all but `inner_frozen` here, the head only in ANIL."""
        return name not in self.inner_frozen

    def support_loss(self, params: Params, buffers: Params, support_x: Tensor,
                     support_y: Tensor) -> Callable[[Params], Tensor]:
        """The support loss as a function of the adapted entries; the others stay as in `params`."""
        return lambda fast: self.loss_fn(forward(self.model, {**params, **fast}, buffers, support_x), support_y)

    def steps(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor, n_steps: int, *,
              batched: bool, first_order: bool, inner_lr: LR | None = None) -> Iterator[Params]:
        """Yield theta_0 = params, ..., theta_n: the inner loop one step at a time.

        `adapt` and `trajectory` both run it, so a variant that changes the inner step overrides
        this (Reptile) or the hooks above (ANIL, MAML++) once. `batched` picks `torch.func.grad`
        over `autograd.grad`; `inner_lr`, when given, replaces the learned or scheduled rates.
        """
        fast = {k: v for k, v in params.items() if self.adapts(k)}
        support_loss = self.support_loss(params, buffers, support_x, support_y)

        def step(lr: LR, *values: Tensor) -> tuple[Tensor, ...]:
            grads, _ = inner_grads(support_loss, dict(zip(fast, values)), first_order=first_order, batched=batched)
            return tuple(sgd_step(dict(zip(fast, values)), grads, lr).values())

        recompute = self.checkpointing and not batched and torch.is_grad_enabled()
        yield params
        for s in range(n_steps):
            lr = self.inner_lr_at(s) if inner_lr is None else inner_lr
            if recompute:  # keep only theta_s; the step's activations are recomputed in the backward
                values = torch.utils.checkpoint.checkpoint(step, lr, *fast.values(), use_reentrant=False)
            else:
                values = step(lr, *fast.values())
            fast = dict(zip(fast, values))
            yield {**params, **fast}

    def adapt(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor,
              inner_steps: int, batched: bool) -> Params:
        """One task's inner loop: SGD on the support loss, differentiable w.r.t. `params`."""
        for params in self.steps(params, buffers, support_x, support_y, inner_steps,
                                 batched=batched, first_order=self.first_order):
            pass
        return params

    def task_loss(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor,
                  query_x: Tensor, query_y: Tensor, batched: bool) -> tuple[Tensor, Tensor]:
        """(query loss after adaptation, query outputs) for one task."""
        adapted = self.adapt(params, buffers, support_x, support_y, self.inner_steps, batched)
        out = forward(self.model, adapted, buffers, query_x)
        return self.loss_fn(out, query_y), out

    # ---- the meta-objective ------------------------------------------------------------------
    def resolve_strategy(self, device: torch.device) -> str:
        if self.strategy != "auto":
            return self.strategy
        strategy = choose_strategy(self.model, device)
        return "vmap" if strategy == "compiled" and fast_path.unsupported(self) else strategy

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> MetaOutput:
        """Mean query loss after adaptation over a batch of tasks (leading dimension)."""
        strategy = self.resolve_strategy(support_x.device)
        if strategy == "compiled" and torch.is_grad_enabled():
            return fast_path.compiled_forward(self, support_x, support_y, query_x, query_y)
        params, buffers = split_state(self.model)
        if strategy in ("vmap", "compiled"):
            with task_batch_norm(self.model, batched=True):
                def one(sx, sy, qx, qy):
                    return self.task_loss(params, buffers, sx, sy, qx, qy, batched=True)
                losses, outs = torch.func.vmap(one, randomness="different")(support_x, support_y, query_x, query_y)
            return MetaOutput(losses.mean(), losses.detach(), outs.detach())

        # Loop: back-propagate each task at once so only one task's graph is alive.
        n_tasks = support_x.shape[0]
        leaves = [p for p in self.parameters() if p.requires_grad]
        total: list[Tensor | None] = [None] * len(leaves)
        losses, outs = [], []
        with task_batch_norm(self.model, batched=False):
            for t in range(n_tasks):
                loss, out = self.task_loss(params, buffers, support_x[t], support_y[t], query_x[t], query_y[t],
                                           batched=False)
                if torch.is_grad_enabled() and leaves:
                    grads = torch.autograd.grad(loss / n_tasks, leaves, allow_unused=True)
                    total = [g if acc is None else (acc if g is None else acc + g) for acc, g in zip(total, grads)]
                losses.append(loss.detach())
                outs.append(out.detach())
        losses = torch.stack(losses)
        mean = losses.mean()
        loss = detached_surrogate(mean, leaves, total) if torch.is_grad_enabled() and leaves else mean
        return MetaOutput(loss, losses, torch.stack(outs))

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

        batched = self.resolve_strategy(support_x.device) in ("vmap", "compiled")
        with self.autocast(support_x.device), task_batch_norm(self.model, batched=batched):
            if batched:
                return torch.func.vmap(one, randomness="different")(support_x, support_y, query_x, query_y)
            return torch.stack([one(*task) for task in zip(support_x, support_y, query_x, query_y)])


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be {' or '.join(PRECISIONS)}, got {precision!r}")
    return precision


def FOMAML(model: nn.Module, **kwargs) -> MAML:
    """First-order MAML: the same update with the inner gradients treated as constants."""
    return MAML(model, first_order=True, **kwargs)
