"""The compiled fast path (`strategy="compiled"`): the whole meta-step as one functional transform.

Why: with small few-shot networks a GPU is launch-bound. A per-task loop launches every kernel once
per task; `vmap` batches the tasks but still launches each op and runs the autograd engine from
Python. Here the meta-gradient is a single `torch.func` transform,

    grads, loss = grad_and_value(theta -> mean_t L_query(adapt_t(theta)))(theta)    # adapt_t: vmap

so no `.backward()` is involved: the traced program is forward-only (its inputs are detached and
require no grad), which `torch.compile` (dynamo + AOTAutograd + Inductor, `dynamic=False`) turns
into fused kernels, and on CUDA `mode="reduce-overhead"` replays as a CUDA graph. The second-order
term needs no special route: AOTAutograd refuses double *backward* ("aot_autograd does not currently
support double backward"), but dynamo traces the nested `torch.func.grad` itself and flattens it
into plain aten ops, so there is no backward through a compiled graph at all.

Measured on torch 2.14.1 (CPU, 2 shared cores): second order and first order both compile with
`fullgraph=True` (Inductor), for an MLP and a conv + BatchNorm net; the meta-gradients equal the
eager ones (< 1e-10) and the float64 per-task reference (< 1e-5) (tests/test_fast_path.py).
Compilation: 20-90 s per test-sized graph, 222 s for the Omniglot conv4 (meta-batch 32), 15 s for
either once Inductor's on-disk cache holds the graph; once per learner, shape, precision,
first_order and inner_steps. benchmarks/meta_step.py against the hand-written per-task loop on a
quiet 2-core CPU: sinusoid 12.5x, Omniglot 5w1s 0.56x at 16x the peak memory (3.1 GiB): batched
convolutions lose on the CPU, which is why `auto` picks this path on CUDA only. GPU timings:
benchmarks/gpu_check.sh.

The forward still returns a `MetaOutput` whose `loss.backward()` yields the meta-gradient
(`core.detached_surrogate`), so training loops, gradient clipping and optimisers are unchanged.
BatchNorm uses the hand-written batched normalisation of `core.task_batch_norm(batched=True)`
(`F.batch_norm` under vmap is wrong in second order on this torch).

Serves learners that change MAML only through its hooks (`inner_lrs`, `adapts`, `support_loss`):
MAML, FOMAML, ANIL, Meta-SGD. Learners that override the inner loop or the meta-objective
(`steps`, `task_loss`, `forward`, ...: Reptile, MAML++) are refused (`unsupported`). If compilation
fails, the same functional step runs eagerly, with a one-time warning.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Mapping

import torch
from torch import Tensor, nn

from mamlbench.algorithms.core import Params, detached_surrogate, forward, split_state, task_batch_norm

# Methods a served learner must inherit from MAML unchanged: the fast path re-implements them.
CORE_METHODS = ("forward", "steps", "adapt", "task_loss", "inner_lr_at")

# The torch.compile backend: "inductor" (fused kernels); tests also use "aot_eager" (the same
# dynamo + AOTAutograd capture without Inductor's code generation, which takes ~30 s per graph on a CPU).
BACKEND = "inductor"
# One graph per learner configuration (model, shapes, inner_steps, first_order, ...), all from the
# same function: beyond dynamo's default of 8 the rest would silently run eagerly. Past this limit,
# dynamo raises and the learner falls back to eager with a warning.
RECOMPILE_LIMIT = 64

_EAGER: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()   # learners whose compilation failed
_COMPILED: dict[tuple[str, str], object] = {}              # (backend, mode) -> compiled meta-step


def unsupported(learner: nn.Module) -> str | None:
    """Why the compiled path cannot serve `learner`, or None when it can."""
    from mamlbench.algorithms.maml import MAML
    if not isinstance(learner, MAML):
        return f"{type(learner).__name__} is not a MAML learner"
    own = [name for name in CORE_METHODS if getattr(type(learner), name) is not getattr(MAML, name)]
    if own:
        return (f"{type(learner).__name__} overrides {', '.join(own)}; the compiled path serves learners "
                f"that only override MAML's hooks (inner_lrs, adapts, support_loss)")
    return None


def split_rates(learner) -> tuple[Params, object]:
    """(learned: the tensors among `learner.inner_lrs()`, fixed: the rest): learned rates (Meta-SGD)
    are meta-parameters too, so they enter the meta-step as inputs; fixed ones as constants."""
    rates = learner.inner_lrs()
    if isinstance(rates, Mapping):
        return ({k: v for k, v in rates.items() if isinstance(v, Tensor)},
                {k: v for k, v in rates.items() if not isinstance(v, Tensor)})
    if isinstance(rates, Tensor):
        return {"": rates}, None
    return {}, rates


def meta_step(learner, params: Params, rates: Params, fixed_rates, buffers: Params, support_x: Tensor,
              support_y: Tensor, query_x: Tensor, query_y: Tensor):
    """(meta-gradients w.r.t. (params, rates), mean query loss, per-task losses, query outputs).

    A pure function of its tensor inputs, compiled as a whole; `rates, fixed_rates` as `split_rates`.
    """
    first_order, inner_steps, loss_fn = learner.first_order, learner.inner_steps, learner.loss_fn

    def objective(meta: tuple[Params, Params]):
        theta, learned = meta
        lr = {**fixed_rates, **learned} if isinstance(fixed_rates, Mapping) else learned.get("", fixed_rates)

        def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
            for adapted in learner.steps(theta, buffers, sx, sy, inner_steps, batched=True,
                                         first_order=first_order, inner_lr=lr):
                pass
            out = forward(learner.model, adapted, buffers, qx)
            return loss_fn(out, qy), out

        losses, outs = torch.func.vmap(one, randomness="different")(support_x, support_y, query_x, query_y)
        return losses.mean(), (losses, outs)

    grads, (loss, (losses, outs)) = torch.func.grad_and_value(objective, has_aux=True)((params, rates))
    return grads, loss, losses, outs


def compile_mode(device: torch.device) -> str:
    """CUDA graphs where they exist (shapes are static); Inductor's default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def compiled_meta_step(mode: str, backend: str | None = None):
    """`meta_step` under torch.compile (static shapes, one graph, no graph breaks), built once per mode."""
    backend = backend or BACKEND
    if (backend, mode) not in _COMPILED:
        options = {"mode": mode} if backend == "inductor" else {}
        _COMPILED[backend, mode] = torch.compile(meta_step, backend=backend, dynamic=False, fullgraph=True,
                                                 **options)
    return _COMPILED[backend, mode]


def compiled_forward(learner, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor):
    """`MAML.forward` for strategy "compiled": same `MetaOutput`, the meta-gradient computed up front."""
    from mamlbench.algorithms.maml import MetaOutput
    reason = unsupported(learner)
    if reason:
        raise ValueError(f"strategy 'compiled': {reason}")
    params, buffers = split_state(learner.model)
    learned, fixed = split_rates(learner)
    inputs = ({k: v.detach() for k, v in params.items()}, {k: v.detach() for k, v in learned.items()}, fixed,
              {k: v.detach() for k, v in buffers.items()}, support_x, support_y, query_x, query_y)
    mode = compile_mode(support_x.device)
    with task_batch_norm(learner.model, batched=True):
        if learner in _EAGER:
            result = meta_step(learner, *inputs)
        else:
            try:
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
                    result = compiled_meta_step(mode)(learner, *inputs)
            except Exception as err:  # noqa: BLE001 - any compiler failure: run the same step eagerly
                _EAGER.add(learner)
                warnings.warn(f"strategy 'compiled': torch.compile failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); running the functional "
                              f"meta-step eagerly", RuntimeWarning, stacklevel=3)
                result = meta_step(learner, *inputs)
    (param_grads, rate_grads), loss, losses, outs = result
    if mode == "reduce-overhead":  # CUDA-graph outputs are overwritten by the next replay
        param_grads = {k: g.clone() for k, g in param_grads.items()}
        rate_grads = {k: g.clone() for k, g in rate_grads.items()}
        loss, losses, outs = loss.clone(), losses.clone(), outs.clone()
    leaves = list(params.values()) + list(learned.values())
    grads = list(param_grads.values()) + list(rate_grads.values())
    return MetaOutput(detached_surrogate(loss, leaves, grads), losses.detach(), outs.detach())


def uses_compiler(learner) -> bool:
    """False once compilation failed for `learner` and its steps run eagerly."""
    return learner not in _EAGER
