"""The shared functional core of every MAML-family algorithm, built on `torch.func`.

A model is split once into `params` (trainable, adapted in the inner loop) and `buffers` (buffers
and frozen parameters: passed through, never adapted). Adapted parameters are plain dicts of
tensors that stay connected to the initial parameters, so the query loss of adapted parameters
differentiates back to the initialisation: second order when the inner gradients keep their graph
(`create_graph`), first order when they are detached.

Two execution strategies compute the same thing:
- `loop`: one task at a time, `torch.autograd.grad` in the inner loop, and the query loss of each
  task back-propagated before the next task starts, so peak memory is one task's graph;
- `vmap`: all tasks at once, `torch.func.grad` inside `torch.func.vmap`, one backward.

BatchNorm follows the original MAML: every forward normalises with the statistics of the batch it
sees (one task's support or query set), in training and in evaluation; running statistics are never
read or written, so nothing leaks across tasks. Under `vmap` a hand-written normalisation replaces
`F.batch_norm`, whose batched second-order gradient is wrong on torch 2.14 (tests/test_core.py
catches that class of error against a per-task reference).

References: Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", ICML 2017.
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]
LR = float | Tensor | Mapping[str, Tensor | float]


def split_state(model: nn.Module) -> tuple[Params, Params]:
    """(trainable parameters, everything else the forward needs: buffers and frozen parameters)."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    rest = {k: p for k, p in model.named_parameters() if not p.requires_grad}
    rest.update(dict(model.named_buffers()))
    return params, rest


def sub_state(state: Params, prefix: str) -> Params:
    """Entries under `prefix.`, with the prefix stripped (the names a submodule's functional_call wants)."""
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Names of the trainable parameters of `model`'s normalisation layers (BatchNorm, LayerNorm, GroupNorm)."""
    kinds = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    return {f"{name}.{p}" if name else p for name, m in model.named_modules() if isinstance(m, kinds)
            for p, value in m.named_parameters(recurse=False) if value.requires_grad}


def _per_task_batch_norm(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    # Native kernel with batch statistics and no running buffers: right for one task at a time.
    return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def _batched_batch_norm(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    # Plain tensor ops: their vmap batching rules are exact in second order, F.batch_norm's are not.
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    x = (x - mean) * torch.rsqrt(var + self.eps)
    if self.weight is not None:
        shape = [1, -1] + [1] * (x.dim() - 2)
        x = x * self.weight.view(shape) + self.bias.view(shape)
    return x


@contextlib.contextmanager
def task_batch_norm(model: nn.Module, batched: bool) -> Iterator[None]:
    """Make every BatchNorm of `model` normalise with the current batch's statistics only."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    impl = _batched_batch_norm if batched else _per_task_batch_norm
    for m in norms:
        m.forward = types.MethodType(impl, m)
    try:
        yield
    finally:
        for m in norms:
            del m.forward


def forward(model: nn.Module, params: Params, buffers: Params, x: Tensor) -> Tensor:
    """The model's output under `params` (call inside `task_batch_norm`)."""
    return functional_call(model, (params, buffers), (x,), strict=False, tie_weights=False)


def _lr_for(inner_lr: LR, name: str) -> float | Tensor:
    return inner_lr[name] if isinstance(inner_lr, Mapping) else inner_lr


def sgd_step(params: Params, grads: Params, inner_lr: LR) -> Params:
    """theta' = theta - alpha * g; `inner_lr` is a scalar or one (learnable) rate per parameter."""
    return {k: p - _lr_for(inner_lr, k) * grads[k] for k, p in params.items()}


def inner_grads(loss_fn: Callable[[Params], Tensor], params: Params, *, first_order: bool,
                batched: bool) -> tuple[Params, Tensor]:
    """Gradient of the support loss w.r.t. `params`, and the loss.

    `create_graph` keeps the graph of the gradient itself so the meta-gradient can flow through it
    (second order); first order detaches the gradient, treating it as a constant.
    """
    if batched:
        grads, loss = torch.func.grad_and_value(loss_fn)(params)
    else:
        loss = loss_fn(params)
        values = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order,
                                     allow_unused=True)
        grads = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), values)}
    if first_order:
        grads = {k: g.detach() for k, g in grads.items()}
    return grads, loss


def inner_loop(loss_fn: Callable[[Params], Tensor], params: Params, inner_lr: LR, inner_steps: int, *,
               first_order: bool = False, batched: bool = False) -> Params:
    """`inner_steps` steps of SGD on `loss_fn` from `params`; the result stays differentiable."""
    for _ in range(inner_steps):
        grads, _ = inner_grads(loss_fn, params, first_order=first_order, batched=batched)
        params = sgd_step(params, grads, inner_lr)
    return params


def choose_strategy(model: nn.Module, device: torch.device | str) -> str:
    """`compiled` on CUDA, `vmap` on other accelerators and for convolution-free models on the CPU,
    `loop` for conv nets on the CPU.

    On CUDA small meta-learning nets are launch-bound: the compiled, task-batched meta-step
    (`fast.py`, CUDA graphs) removes the launches. On the CPU, convolutions batched over tasks by
    `vmap` ran ~2x slower with ~4x the memory of a per-task loop (benchmarks/meta_step.py); small
    MLPs are launch-bound, where `vmap` wins. `MAML.resolve_strategy` falls back from `compiled` to
    `vmap` for learners the compiled path does not serve.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return "compiled"
    if kind != "cpu":
        return "vmap"
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return "loop" if has_conv else "vmap"


def detached_surrogate(value: Tensor, leaves: list[Tensor], grads: list[Tensor | None]) -> Tensor:
    """A scalar equal to `value` whose gradient w.r.t. `leaves` is `grads`.

    The loop strategy back-propagates task by task to keep one task's graph in memory; this lets it
    still hand back a loss on which `.backward()` yields the meta-gradient.
    """
    out = value.detach().clone()
    for leaf, g in zip(leaves, grads):
        if g is not None:
            out = out + (leaf * g).sum() - (leaf.detach() * g).sum()
    return out
