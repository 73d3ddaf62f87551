"""MAML++: six changes to MAML that stabilise training and raise accuracy, each switchable.

1. Multi-step loss (MSL): the meta-loss is a weighted sum of the query losses after every inner
   step, not the last one only; the weights start uniform and anneal towards the last step, after
   which only the last step counts. Gradients then reach the initialisation through short paths too.
2. Derivative-order annealing (DA): first-order meta-gradients for the first iterations (cheap,
   stable while the initialisation is poor), second order afterwards.
3. Per-step BatchNorm running statistics (BNRS): one set of running statistics per inner step,
   since the activations after s steps have their own distribution; read at evaluation time
   only with `eval_running_stats` (below).
4. Per-step BatchNorm weights and biases (BNWB): one affine pair per inner step, meta-learned and
   not adapted in the inner loop (an update to the step-s pair would only be seen by step s). A
   replaced BatchNorm's pair is never adapted, per step or not, as the reference
   (`enable_inner_loop_optimizable_bn_params: false`).
5. Learned per-layer per-step inner learning rates (LSLR): one learnable scalar per parameter tensor
   and inner step, initialised to `inner_lr`.
6. Cosine annealing of the meta learning rate (CA): `MAMLPlusPlus.meta_lr(i, total, base)`, which
   the training loop writes into its optimiser each iteration.

Schedules (MSL, DA, CA) count epochs of `iterations_per_epoch` meta-updates, as the reference
(`epoch = current_iter // 500`, experiment_builder.py): every schedule reads the first iteration
of the current epoch, so it moves in whole epochs; `iterations_per_epoch: 1` moves it every
meta-update. The training loop sets the iteration with `set_iteration(i)`. Lengths stay in
meta-updates: the reference's `multi_step_loss_num_epochs` M is `multi_step_loss_iterations` =
M x 500, and its `first_order_to_second_order_epoch` f is `first_order_iterations` = (f + 1) x 500
(its configs set f = -1: DA off, second order from the start).

Per-step tables (BatchNorm slots, LSLR rates), `per_step_slots`:
- "reference": S slots; slot s serves the support pass of theta_s and the query pass of theta_{s+1}
  that follows the update (the reference's `num_step`, few_shot_learning_system.py L215-243).
- "state": S + 1 slots; slot s serves every forward of theta_s, so the query after the last step
  has its own.
Evaluation with more steps than S reuses the last slot and the last rate, which no training
support pass used in that role: evaluate with the training steps (the reference does).

BatchNorm statistics, `eval_running_stats`: the reference's BatchNorm always normalises with the
batch's statistics (`F.batch_norm(..., training=True)`, meta_neural_network_architectures.py
L246), so its per-step running statistics are collected but never read (false, the default). The
paper's text reads them at evaluation (true): `trajectory` then runs in eval mode and slot s
normalises with its running statistics. Evaluation never writes them either way. Only when they are
read do they force the per-task loop (in-place writes cannot happen inside vmap); otherwise vmap
training leaves them unwritten.

References: Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019 (section 4), and
github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch (loss weights: `get_per_step_loss_importance_vector`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamlbench.algorithms.core import LR, Params, forward
from mamlbench.algorithms.metasgd import param_key
from mamlbench.algorithms.maml import MAML
from mamlbench.schema import knob


@dataclass(frozen=True)
class MAMLPPParams:
    """The `mamlpp` section: the six MAML++ changes; the defaults are the reference code's."""
    multi_step_loss: bool = knob(True, "MSL: meta-loss over the query losses after every inner step.")
    multi_step_loss_iterations: int = knob(5000, "MSL anneals its weights towards the last step over this many "
                                                 "meta-updates, then stops (reference: Omniglot 10 epochs x 500, "
                                                 "mini-ImageNet 15 x 500).", ge=1)
    derivative_order_annealing: bool = knob(False, "DA: first-order meta-gradients for the first iterations "
                                                   "(reference configs: off, first_order_to_second_order_epoch -1).")
    first_order_iterations: int = knob(25000, "DA: meta-updates done in first order (the paper's text: 50 epochs "
                                              "x 500; reference epoch f: (f + 1) x 500).", ge=0)
    iterations_per_epoch: int = knob(500, "MSL, DA and CA move once per epoch of this many meta-updates, as the "
                                          "reference (total_iter_per_epoch); 1: every meta-update.", ge=1)
    per_step_bn_stats: bool = knob(True, "BNRS: BatchNorm running statistics per inner step (the loop strategy "
                                         "when eval_running_stats reads them).")
    eval_running_stats: bool = knob(False, "BNRS: true: evaluation normalises with the per-step running statistics "
                                           "(the paper's text); false: batch statistics, the statistics are never "
                                           "read (the reference code).")
    per_step_slots: Literal["reference", "state"] = knob(
        "reference", "Per-step BatchNorm slots: reference: S slots, slot s for the support pass of theta_s and the "
                     "query pass of theta_s+1 (the reference's num_step); state: S+1 slots, slot s for theta_s.")
    per_step_bn_weights: bool = knob(True, "BNWB: BatchNorm weights and biases per inner step.")
    lslr: bool = knob(True, "LSLR: learned inner learning rate per parameter tensor and inner step.")
    cosine_annealing: bool = knob(True, "CA: cosine annealing of the meta learning rate.")
    min_meta_lr: float = knob(1e-5, "CA: meta learning rate at the last iteration.", ge=0)


def multi_step_loss_weights(n_steps: int, iteration: int, msl_iterations: int) -> list[float]:
    """Importance of the query loss after each of the n inner steps; they sum to 1.

    Uniform at iteration 0; every non-final weight decays linearly to 0.03/n over `msl_iterations`
    while the final one takes up the rest. From `msl_iterations` on: the last step only.
    """
    if iteration >= msl_iterations:
        return [0.0] * (n_steps - 1) + [1.0]
    decay = iteration / (n_steps * msl_iterations)
    floor = 0.03 / n_steps
    early = [max(1.0 / n_steps - decay, floor) for _ in range(n_steps - 1)]
    last = min(1.0 / n_steps + decay * (n_steps - 1), 1.0 - floor * (n_steps - 1))
    return early + [last]


def cosine_annealing_lr(iteration: int, total_iterations: int, base_lr: float, min_lr: float) -> float:
    """min_lr + (base_lr - min_lr) (1 + cos(pi i / T)) / 2: base_lr at i = 0, min_lr at i >= T."""
    t = min(max(iteration, 0), total_iterations) / max(total_iterations, 1)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t))


class PerStepBatchNorm(nn.Module):
    """BatchNorm with per-step weights/biases and/or running statistics, indexed by `self.step`.

    Normalises with the batch's statistics (plain tensor ops, exact under vmap in second order),
    except in eval mode with `eval_running_stats`. Running statistics are written only while
    `track` is set (MAML++'s meta-training forward in the loop strategy), never by evaluation.
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, n_slots: int, per_step_weights: bool,
                 per_step_stats: bool, eval_running_stats: bool = False):
        super().__init__()
        c = norm.num_features
        self.eps, self.momentum = norm.eps, 0.1 if norm.momentum is None else norm.momentum
        self.n_slots, self.per_step_weights, self.eval_running_stats = n_slots, per_step_weights, eval_running_stats
        self.step, self.track = 0, False
        weight = norm.weight.detach() if norm.affine else torch.ones(c)
        bias = norm.bias.detach() if norm.affine else torch.zeros(c)
        if per_step_weights:
            self.weight = nn.Parameter(weight.expand(n_slots, c).clone())  # (slots, C)
            self.bias = nn.Parameter(bias.expand(n_slots, c).clone())
        else:
            self.weight, self.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())
        if per_step_stats:
            self.register_buffer("running_mean", torch.zeros(n_slots, c, dtype=weight.dtype))
            self.register_buffer("running_var", torch.ones(n_slots, c, dtype=weight.dtype))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, ...) -> same
        s = min(self.step, self.n_slots - 1)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.running_mean is not None and not self.training and self.eval_running_stats:
            mean, var = self.running_mean[s].view(shape), self.running_var[s].view(shape)
        else:
            mean = x.mean(dims, keepdim=True)
            var = x.var(dims, unbiased=False, keepdim=True)
            if self.track and self.running_mean is not None:
                with torch.no_grad():
                    n = x.numel() // x.shape[1]
                    self.running_mean[s].lerp_(mean.detach().flatten().to(self.running_mean.dtype), self.momentum)
                    self.running_var[s].lerp_((var.detach().flatten() * n / max(n - 1, 1)).to(self.running_var.dtype), self.momentum)
        weight = self.weight[s] if self.per_step_weights else self.weight
        bias = self.bias[s] if self.per_step_weights else self.bias
        return (x - mean) * torch.rsqrt(var + self.eps) * weight.view(shape) + bias.view(shape)


class MAMLPlusPlus(MAML):
    """MAML++ around `model`: MAML plus the switches of `MAMLPPParams` (see the module docstring).

    Args:
        model: any `nn.Module`; its BatchNorm layers are replaced in place by `PerStepBatchNorm`
            when `per_step_bn_stats` or `per_step_bn_weights` is on.
        inner_lr: initial LSLR rates, or the fixed step size without LSLR.
        inner_steps: S, the inner steps in training; sizes the per-step tables (>= 1).
        strategy, loss_fn: as `MAML`; running statistics that are read need "loop" ("auto" picks it).
        first_order: first order throughout (DA then has nothing to anneal).
        **MAMLPPParams fields.

    References: Antoniou et al., ICLR 2019.

    Example:
        learner = MAMLPlusPlus(build_model("vgg_mamlpp", n_way=5), inner_lr=0.1, inner_steps=5)
        opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
        for i in range(iterations):
            learner.set_iteration(i)
            for group in opt.param_groups:
                group["lr"] = learner.meta_lr(i, iterations, 1e-3)
            out = learner(support_x, support_y, query_x, query_y)
            opt.zero_grad(); out.loss.backward(); opt.step()
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 5, first_order: bool = False,
                 strategy: str = "auto", loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy, *,
                 multi_step_loss: bool = True, multi_step_loss_iterations: int = 5000,
                 derivative_order_annealing: bool = False, first_order_iterations: int = 25000,
                 iterations_per_epoch: int = 500, per_step_bn_stats: bool = True, eval_running_stats: bool = False,
                 per_step_slots: str = "reference", per_step_bn_weights: bool = True,
                 lslr: bool = True, cosine_annealing: bool = True, min_meta_lr: float = 1e-5):
        if inner_steps < 1:
            raise ValueError(f"MAML++ needs inner_steps >= 1 (its tables are per step), got {inner_steps}")
        if per_step_slots not in ("reference", "state"):
            raise ValueError(f"per_step_slots must be reference or state, got {per_step_slots!r}")
        if iterations_per_epoch < 1:
            raise ValueError(f"iterations_per_epoch must be >= 1, got {iterations_per_epoch}")
        super().__init__(model, inner_lr, inner_steps, first_order, strategy, loss_fn)
        self.multi_step_loss, self.multi_step_loss_iterations = multi_step_loss, multi_step_loss_iterations
        self.derivative_order_annealing = derivative_order_annealing
        self.first_order_iterations = first_order_iterations
        self.iterations_per_epoch = iterations_per_epoch
        self.cosine_annealing, self.min_meta_lr = cosine_annealing, min_meta_lr
        self.per_step_slots = per_step_slots
        self.iteration = 0
        n_slots = inner_steps if per_step_slots == "reference" else inner_steps + 1

        self.norms: list[PerStepBatchNorm] = []
        fixed: set[str] = set()
        if per_step_bn_stats or per_step_bn_weights:
            for name, module in list(model.named_modules()):
                for child_name, child in list(module.named_children()):
                    if isinstance(child, nn.modules.batchnorm._BatchNorm):
                        norm = PerStepBatchNorm(child, n_slots, per_step_weights=per_step_bn_weights,
                                                per_step_stats=per_step_bn_stats, eval_running_stats=eval_running_stats)
                        setattr(module, child_name, norm)
                        self.norms.append(norm)
                        # meta-learned only, as the reference (enable_inner_loop_optimizable_bn_params false)
                        full = f"{name}.{child_name}" if name else child_name
                        fixed |= {f"{full}.weight", f"{full}.bias"}
        self.fixed = fixed
        self.reads_running_stats = per_step_bn_stats and eval_running_stats and bool(self.norms)
        if self.reads_running_stats and strategy == "vmap":
            raise ValueError("per_step_bn_stats with eval_running_stats needs strategy loop or auto: running "
                             "statistics cannot be written from inside vmap")
        fast = {k: p for k, p in model.named_parameters() if p.requires_grad and self.adapts(k)}
        self.fast_names = list(fast)
        # One learnable rate per parameter tensor and inner step, shape (S,).
        self.lslr = nn.ParameterDict({
            param_key(k): nn.Parameter(torch.full((inner_steps,), float(inner_lr), dtype=p.dtype, device=p.device))
            for k, p in fast.items()}) if lslr else None

    # ---- what the training loop calls --------------------------------------------------------
    def set_iteration(self, iteration: int) -> None:
        """The current meta-update index: drives MSL's weights and DA's order."""
        self.iteration = iteration

    def epoch_start(self, iteration: int) -> int:
        """The first meta-update of `iteration`'s epoch: what the schedules read (the reference's int(epoch))."""
        return iteration // self.iterations_per_epoch * self.iterations_per_epoch

    def meta_lr(self, iteration: int, total_iterations: int, base_lr: float) -> float:
        """Meta learning rate for `iteration`: cosine-annealed to `min_meta_lr`, or `base_lr` when CA is off.

        Per epoch: the reference's CosineAnnealingLR(T_max=total_epochs) stepped with the epoch index.
        """
        if not self.cosine_annealing:
            return base_lr
        return cosine_annealing_lr(self.epoch_start(iteration), total_iterations, base_lr, self.min_meta_lr)

    def step_weights(self) -> list[float] | None:
        """MSL weights of the query loss after each step now; None: the last step only."""
        start = self.epoch_start(self.iteration)
        if not self.multi_step_loss or start >= self.multi_step_loss_iterations:
            return None
        return multi_step_loss_weights(self.inner_steps, start, self.multi_step_loss_iterations)

    @property
    def first_order(self) -> bool:
        start = self.epoch_start(self.iteration)
        annealing = self.derivative_order_annealing and start < self.first_order_iterations
        return self._first_order or annealing

    @first_order.setter
    def first_order(self, value: bool) -> None:
        self._first_order = value

    # ---- the variant's hooks -----------------------------------------------------------------
    def inner_lr_at(self, step: int) -> LR:
        if self.lslr is None:
            return self.inner_lr
        s = min(step, self.inner_steps - 1)
        return {k: self.lslr[param_key(k)][s] for k in self.fast_names}

    def adapts(self, name: str) -> bool:
        return name not in self.fixed and super().adapts(name)  # BatchNorm pairs: meta-learned only

    def steps(self, *args, **kwargs) -> Iterator[Params]:
        """`MAML.steps` with BatchNorm on the query slot of theta_s while the caller holds it, and on
        slot s while its support gradient is taken (when the generator resumes)."""
        if self.checkpointing:  # a recomputed step would run on whichever slot is set at backward time
            raise ValueError("checkpointing is not supported by mamlpp (its BatchNorm slot is set per step)")
        for s, params in enumerate(super().steps(*args, **kwargs)):
            self.use_slot(max(s - 1, 0) if self.per_step_slots == "reference" else s)
            yield params
            self.use_slot(s)

    def use_slot(self, slot: int) -> None:
        for norm in self.norms:
            norm.step = slot

    def task_loss(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor,
                  query_x: Tensor, query_y: Tensor, batched: bool) -> tuple[Tensor, Tensor]:
        """MSL: sum_s w_s L_query(theta_s) over s = 1..S, or L_query(theta_S) alone."""
        weights = self.step_weights()
        losses = []
        for s, p in enumerate(self.steps(params, buffers, support_x, support_y, self.inner_steps,
                                         batched=batched, first_order=self.first_order)):
            if s > 0 and (weights is not None or s == self.inner_steps):
                out = forward(self.model, p, buffers, query_x)
                losses.append(self.loss_fn(out, query_y))
        loss = losses[-1] if weights is None else sum(w * l for w, l in zip(weights, losses))
        return loss, out

    def resolve_strategy(self, device: torch.device) -> str:
        if self.reads_running_stats:
            return "loop"  # running statistics are written in place, which vmap cannot do
        return super().resolve_strategy(device)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor):
        """As `MAML.forward`; in training mode the loop strategy also updates the per-step running statistics."""
        track = self.training and torch.is_grad_enabled() and self.resolve_strategy(support_x.device) == "loop"
        for norm in self.norms:
            norm.track = track
        try:
            return super().forward(support_x, support_y, query_x, query_y)
        finally:
            for norm in self.norms:
                norm.track = False

    def trajectory(self, *args, **kwargs) -> Tensor:
        """`MAML.trajectory` in eval mode: BatchNorm reads the running statistics when `eval_running_stats`."""
        was_training = self.training
        self.eval()
        try:
            return super().trajectory(*args, **kwargs)
        finally:
            self.train(was_training)
