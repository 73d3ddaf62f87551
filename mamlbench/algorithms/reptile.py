"""Reptile: move the initialisation towards the weights each task's training reaches.

For each task t, run k steps of SGD (or Adam) on its data from theta to phi_t; then
theta <- theta + epsilon (mean_t phi_t - theta). No second derivatives and no query set: the query
set only scores the adapted weights for monitoring.

To plug into the same training loop as MAML, `forward` returns a `MetaOutput` whose `loss` has the
value of the mean query loss after adaptation but whose gradient w.r.t. theta is
(theta - mean_t phi_t). Then `loss.backward(); opt.step()` with `torch.optim.SGD(lr=epsilon)` is
exactly the Reptile update, and with Adam it is the paper's "Reptile gradient fed to Adam" variant
(Nichol et al., section 3). Nichol et al. anneal epsilon linearly to 0: `meta_lr` gives it.

The reference code (openai/supervised-reptile) differs from a per-task-independent inner loop in
three ways, each an option here:
- minibatches (`inner_batch_size`, `eval_inner_batch_size`): `_mini_batches` reshuffles the task's
  examples at every pass and cuts the stream of passes into batches, so a batch may straddle two
  passes (reptile.py:223-248); `minibatch_indices` is that stream;
- `persistent_adam`: `train_step` resets only the trainable variables between tasks, so the inner
  Adam's moments and its step count (hence its bias correction) carry over from task to task and
  from meta-iteration to meta-iteration (reptile.py:62-74); `evaluate` restores everything after
  each test task (reptile.py:114, 122), so test-time adaptation starts from the training state;
- `transductive`: test images predicted together (BatchNorm statistics of the N test images) or
  each one in a batch with the training images (reptile.py:125-134).
The inner Adam is TensorFlow's (`tf.train.AdamOptimizer`): the bias correction folded into the
step size, epsilon added to sqrt(v) uncorrected.

References: Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms",
arXiv:1803.02999, 2018 (Algorithm 2, batched version), and github.com/openai/supervised-reptile.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamlbench.algorithms.core import LR, Params, detached_surrogate, forward, inner_grads, sgd_step, split_state, \
    task_batch_norm
from mamlbench.algorithms.maml import MAML, MetaOutput
from mamlbench.schema import ConfigError, knob

EVAL_SEED = 20180308  # the evaluation minibatch shuffles when no generator is set: same numbers on every call


@dataclass(frozen=True)
class ReptileParams:
    """The `reptile` section: the inner optimiser, its minibatches and state, the test-time predictions."""
    inner_optimizer: Literal["sgd", "adam"] = knob("sgd", "Inner optimiser on each task; the reference: adam "
                                                          "(inner_lr 0.001, betas 0, 0.999).")
    inner_batch_size: int | None = knob(None, "Examples per inner step in meta-training, drawn as the reference's "
                                              "_mini_batches (reshuffled every pass, a batch may straddle two "
                                              "passes); null: the whole training set of the task.", ge=1)
    eval_inner_batch_size: int | None = knob(None, "The same at validation and test time (the reference's "
                                                   "--eval-batch); null: the whole support set.", ge=1)
    adam_betas: list[float] = knob([0.0, 0.999], "Inner Adam's betas (the reference: beta1 = 0).", ge=0, lt=1)
    persistent_adam: bool = knob(False, "Keep the inner Adam's moments and step count across tasks and "
                                        "meta-iterations, as the reference (saved in checkpoints; evaluation "
                                        "starts each test task from a copy). Tasks then run one after the "
                                        "other: meta-training uses the loop strategy whatever `strategy` says. "
                                        "false: a fresh state per task.")
    inner_loss: Literal["mean", "sum"] = knob("mean", "Inner objective over a minibatch: mean cross-entropy, or "
                                                      "the sum the reference minimises (TF minimize of a vector "
                                                      "loss); under Adam they differ only through epsilon.")
    transductive: bool = knob(True, "Predict the test images together (BatchNorm statistics of the test batch); "
                                    "false: each test image in one batch with the support set, as the "
                                    "reference's non-transductive evaluation.")
    transductive_batch: Literal["query_set", "one_per_class"] = knob(
        "query_set", "With transductive: the whole query set in one batch, or batches of one image per class "
                     "(the reference's test batch: N images).")
    meta_optimizer: Literal["sgd", "adam"] = knob("sgd", "Outer optimiser: sgd with lr epsilon is Reptile as "
                                                         "defined; adam treats theta - phi as a gradient.")
    final_meta_lr: float | None = knob(0.0, "Anneal epsilon linearly from the meta lr to this; null: constant.", ge=0)

    def validate(self, where: str = "") -> None:
        if len(self.adam_betas) != 2:
            raise ConfigError(f"{where + '.' if where else ''}adam_betas = {self.adam_betas!r}: expected two numbers")


def minibatch_indices(shuffles: Tensor, batch: int, n_batches: int) -> Tensor:
    """(..., n_batches, batch) example indices, the reference's `_mini_batches` without replacement.

    `shuffles` (..., passes, n): one permutation per pass, applied to the list as it stands (as
    `random.shuffle` shuffles the already shuffled list); the passes are concatenated and cut into
    batches, the remainder of a pass filling the next batch with the next pass's first examples.
    """
    *lead, passes, n = shuffles.shape
    if passes * n < batch * n_batches:
        raise ValueError(f"{passes} passes of {n} examples cannot fill {n_batches} batches of {batch}")
    order = torch.arange(n, device=shuffles.device).expand(*lead, n)
    stream = []
    for p in range(passes):
        order = order.gather(-1, shuffles[..., p, :])
        stream.append(order)
    return torch.cat(stream, -1)[..., :batch * n_batches].reshape(*lead, n_batches, batch)


def draw_minibatches(n_tasks: int, n: int, batch: int, n_batches: int,
                     generator: torch.Generator | None) -> Tensor:
    """(n_tasks, n_batches, batch): each task's minibatches, from uniform shuffles drawn on the CPU."""
    passes = -(-batch * n_batches // n)
    shuffles = torch.rand(n_tasks, passes, n, generator=generator).argsort(-1)
    return minibatch_indices(shuffles, batch, n_batches)


class Reptile(MAML):
    """Reptile around `model` (meta-update through `loss.backward()`, see the module docstring).

    Args:
        model, strategy, loss_fn: as `MAML`.
        inner_lr: step size of the inner optimiser.
        inner_steps: inner steps k per task in meta-training.
        inner_optimizer, inner_batch_size, eval_inner_batch_size, adam_betas, persistent_adam,
        inner_loss, transductive, transductive_batch: see `ReptileParams`.
        meta_optimizer, final_meta_lr: read by the training loop (`meta_lr`).

    References: Nichol et al., 2018.

    Example:
        learner = Reptile(model, inner_lr=0.001, inner_steps=5, inner_optimizer="adam", persistent_adam=True)
        opt = torch.optim.SGD(learner.parameters(), lr=1.0)          # lr is epsilon
        out = learner(support_x, support_y, query_x, query_y)
        opt.zero_grad(); out.loss.backward(); opt.step()             # theta += eps (mean phi - theta)
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.001, inner_steps: int = 5, strategy: str = "auto",
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy, *,
                 inner_optimizer: str = "sgd", inner_batch_size: int | None = None,
                 eval_inner_batch_size: int | None = None,
                 adam_betas: tuple[float, float] | list[float] = (0.0, 0.999), persistent_adam: bool = False,
                 inner_loss: str = "mean", transductive: bool = True, transductive_batch: str = "query_set",
                 meta_optimizer: str = "sgd", final_meta_lr: float | None = 0.0):
        super().__init__(model, inner_lr, inner_steps, first_order=True, strategy=strategy, loss_fn=loss_fn)
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"inner_optimizer must be sgd or adam, got {inner_optimizer!r}")
        if persistent_adam and inner_optimizer != "adam":
            raise ValueError("persistent_adam needs inner_optimizer adam")
        if inner_loss not in ("mean", "sum") or transductive_batch not in ("query_set", "one_per_class"):
            raise ValueError(f"inner_loss must be mean|sum and transductive_batch query_set|one_per_class, "
                             f"got {inner_loss!r}, {transductive_batch!r}")
        self.inner_optimizer, self.inner_batch_size = inner_optimizer, inner_batch_size
        self.eval_inner_batch_size = eval_inner_batch_size
        self.adam_betas, self.adam_eps = tuple(adam_betas), 1e-8   # TF's default epsilon
        self.persistent_adam, self.inner_loss = persistent_adam, inner_loss
        self.transductive, self.transductive_batch = transductive, transductive_batch
        self.meta_optimizer, self.final_meta_lr = meta_optimizer, final_meta_lr
        # Draws the minibatch shuffles; None: the global RNG in training, a fixed seed in evaluation.
        # For a bit-exact resume the training loop sets a per-iteration one (`mamlbench.rng.generator`).
        self.generator: torch.Generator | None = None
        if persistent_adam:
            # Buffers of the learner (not of the model: the inner loop never sees them), flat over
            # the trainable parameters in `split_state` order, so state_dict and checkpoints carry them.
            params, _ = split_state(model)
            n = sum(p.numel() for p in params.values())
            dtype = next(iter(params.values())).dtype
            self.register_buffer("inner_adam_m", torch.zeros(n, dtype=dtype))
            self.register_buffer("inner_adam_v", torch.zeros(n, dtype=dtype))
            self.register_buffer("inner_adam_step", torch.zeros((), dtype=torch.int64))

    def meta_lr(self, iteration: int, total_iterations: int, base_lr: float) -> float:
        """epsilon at `iteration`: linear from `base_lr` to `final_meta_lr` (Nichol et al.)."""
        if self.final_meta_lr is None:
            return base_lr
        frac = min(iteration / max(total_iterations, 1), 1.0)
        return (1 - frac) * base_lr + frac * self.final_meta_lr

    # ---- the inner Adam's state ------------------------------------------------------------
    def fresh_adam(self, params: Params) -> dict:
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        return {"m": zeros, "v": dict(zeros), "step": torch.zeros((), dtype=torch.int64, device=_device(params))}

    def stored_adam(self, params: Params) -> dict:
        """The persistent state as views shaped like `params`; the steps rebind, never write, them."""
        sizes = [p.numel() for p in params.values()]

        def unflat(flat: Tensor) -> Params:
            return {k: c.view_as(p) for (k, p), c in zip(params.items(), flat.split(sizes))}
        return {"m": unflat(self.inner_adam_m), "v": unflat(self.inner_adam_v), "step": self.inner_adam_step}

    def store_adam(self, adam: dict) -> None:
        self.inner_adam_m.copy_(torch.cat([t.reshape(-1) for t in adam["m"].values()]))
        self.inner_adam_v.copy_(torch.cat([t.reshape(-1) for t in adam["v"].values()]))
        self.inner_adam_step.copy_(adam["step"])

    def adam_step(self, params: Params, grads: Params, adam: dict, lr: LR) -> Params:
        """One step of TF's Adam on the entries of `grads`; advances `adam` (rebinding its entries) and
        returns those entries' new values."""
        b1, b2 = self.adam_betas
        adam["step"] = step = adam["step"] + 1
        t = step.double()
        lr_t = torch.sqrt(1 - b2 ** t) / (1 - b1 ** t)   # bias correction, in float64
        adam["m"] = m = {**adam["m"], **{k: b1 * adam["m"][k] + (1 - b1) * g for k, g in grads.items()}}
        adam["v"] = v = {**adam["v"], **{k: b2 * adam["v"][k] + (1 - b2) * g * g for k, g in grads.items()}}
        return {k: params[k] - (lr * lr_t).to(params[k].dtype) * m[k] / (v[k].sqrt() + self.adam_eps) for k in grads}

    # ---- the inner loop --------------------------------------------------------------------
    def steps(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor, n_steps: int, *,
              batched: bool = True, first_order: bool = True, inner_lr: LR | None = None,
              batches: Tensor | None = None, adam: dict | None = None) -> Iterator[Params]:
        """phi_0 = theta, ..., phi_k. `batches` (n_steps, batch): the examples of each step (None: all);
        `adam`: the state to continue, advanced in place (None: a fresh one)."""
        lr = self.inner_lr if inner_lr is None else inner_lr
        if self.inner_optimizer == "adam" and adam is None:
            adam = self.fresh_adam(params)
        yield params
        for s in range(n_steps):
            x, y = (support_x, support_y) if batches is None else (support_x[batches[s]], support_y[batches[s]])

            def loss(p: Params, x=x, y=y) -> Tensor:
                value = self.loss_fn(forward(self.model, p, buffers, x), y)
                return value * y.shape[0] if self.inner_loss == "sum" else value
            # Reptile never differentiates through the inner loop: torch.func.grad, no graph kept.
            grads, _ = inner_grads(loss, params, first_order=True, batched=True)
            grads = {k: g for k, g in grads.items() if self.adapts(k)}  # adapt_norm false: BatchNorm's stay
            params = {**params, **(sgd_step({k: params[k] for k in grads}, grads, lr) if self.inner_optimizer == "sgd"
                                   else self.adam_step(params, grads, adam, lr))}
            yield params

    def minibatches(self, n_tasks: int, n: int, batch: int | None, n_steps: int,
                    generator: torch.Generator | None, device: torch.device) -> Tensor | None:
        if batch is None or n_steps == 0:
            return None
        return draw_minibatches(n_tasks, n, batch, n_steps, generator).to(device)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> MetaOutput:
        """Adapt to every task; `loss.backward()` puts theta - mean_t phi_t into the parameters' `.grad`."""
        if self.persistent_adam and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ValueError("persistent_adam: one inner Adam state runs through the meta-batch's tasks in order, "
                             "which a meta-batch split over processes cannot do (run one process, or set "
                             "variants.reptile.options.persistent_adam: false)")
        params, buffers = split_state(self.model)
        theta = {k: v.detach() for k, v in params.items()}
        n_tasks, n_support = support_x.shape[:2]
        # (tasks, steps, batch), drawn here so vmap and loop see the same batches.
        batches = self.minibatches(n_tasks, n_support, self.inner_batch_size, self.inner_steps, self.generator,
                                   support_x.device)
        adam = self.stored_adam(theta) if self.persistent_adam else None  # carried from task to task

        def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, task_batches: Tensor | None):
            for phi in self.steps(theta, buffers, sx, sy, self.inner_steps, batches=task_batches, adam=adam):
                pass
            out = forward(self.model, phi, buffers, qx)
            return phi, self.loss_fn(out, qy), out

        batched = not self.persistent_adam and self.resolve_strategy(support_x.device) == "vmap"
        with torch.no_grad(), task_batch_norm(self.model, batched=batched):
            if batched:
                in_dims = (0, 0, 0, 0, None if batches is None else 0)
                phis, losses, outs = torch.func.vmap(one, in_dims=in_dims, randomness="different")(
                    support_x, support_y, query_x, query_y, batches)
                mean_phi = {k: v.mean(0) for k, v in phis.items()}
            else:
                # Running sum instead of a stack: memory of one extra copy of the weights.
                mean_phi = {k: torch.zeros_like(v) for k, v in theta.items()}
                losses, outs = [], []
                for t in range(n_tasks):
                    phi, loss, out = one(support_x[t], support_y[t], query_x[t], query_y[t],
                                         None if batches is None else batches[t])
                    for k in mean_phi:
                        mean_phi[k] += phi[k] / n_tasks
                    losses.append(loss)
                    outs.append(out)
                losses, outs = torch.stack(losses), torch.stack(outs)
            if adam is not None:
                self.store_adam(adam)
        value = losses.mean()
        if not torch.is_grad_enabled():
            return MetaOutput(value, losses, outs)
        leaves = list(params.values())
        reptile_grads = [theta[k] - mean_phi[k] for k in params]
        return MetaOutput(detached_surrogate(value, leaves, reptile_grads), losses, outs)

    # ---- evaluation ------------------------------------------------------------------------
    def predict(self, params: Params, buffers: Params, support_x: Tensor, query_x: Tensor,
                groups: Tensor | None) -> Tensor:
        """Query logits under `params`: transductive (the query set, or `groups` (G, N) of one image per
        class, in one batch each) or not (each query image in one batch with the support set)."""
        if not self.transductive:
            return torch.func.vmap(lambda q: forward(self.model, params, buffers, torch.cat([support_x, q[None]]))[-1])(
                query_x)
        if groups is None:
            return forward(self.model, params, buffers, query_x)
        logits = torch.func.vmap(lambda g: forward(self.model, params, buffers, query_x[g]))(groups)  # (G, N, C)
        return logits.flatten(0, 1)[groups.flatten().argsort()]

    @torch.no_grad()
    def trajectory(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                   inner_steps: int, metric: Callable[[Tensor, Tensor], Tensor] | None = None,
                   inner_lr: LR | None = None) -> Tensor:
        """Query metric of each task after 0..inner_steps steps, (tasks, steps+1), as the reference's
        `evaluate`: minibatches of `eval_inner_batch_size`, each task's Adam starting from a copy of
        the persistent state (which stays as it was), predictions transductive or not."""
        metric = metric or self.loss_fn
        params, buffers = split_state(self.model)
        params = {k: v.detach() for k, v in params.items()}
        n_tasks, n_support = support_x.shape[:2]
        generator = self.generator if self.generator is not None else torch.Generator().manual_seed(EVAL_SEED)
        batches = self.minibatches(n_tasks, n_support, self.eval_inner_batch_size, inner_steps, generator,
                                   support_x.device)
        groups = one_per_class(query_y) if self.transductive and self.transductive_batch == "one_per_class" else None
        start = self.stored_adam(params) if self.persistent_adam else None

        def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, task_batches: Tensor | None,
                task_groups: Tensor | None) -> Tensor:
            adam = None if start is None else dict(start)  # a copy per task: steps rebind its entries
            return torch.stack([metric(self.predict(p, buffers, sx, qx, task_groups), qy)
                                for p in self.steps(params, buffers, sx, sy, inner_steps, inner_lr=inner_lr,
                                                    batches=task_batches, adam=adam)])

        # Always the hand-written BatchNorm: the predictions vmap over queries even in the loop.
        with self.autocast(support_x.device), task_batch_norm(self.model, batched=True):
            if self.resolve_strategy(support_x.device) in ("vmap", "compiled"):
                in_dims = (0, 0, 0, 0, None if batches is None else 0, None if groups is None else 0)
                return torch.func.vmap(one, in_dims=in_dims, randomness="different")(
                    support_x, support_y, query_x, query_y, batches, groups)
            return torch.stack([one(support_x[t], support_y[t], query_x[t], query_y[t],
                                    None if batches is None else batches[t], None if groups is None else groups[t])
                                for t in range(n_tasks)])


def one_per_class(labels: Tensor) -> Tensor:
    """(tasks, G, N) query indices: group g holds the g-th image of each of the N classes."""
    n_classes = int(labels.max()) + 1
    counts = torch.stack([(labels == c).sum(-1) for c in range(n_classes)], -1)
    if not bool((counts == counts[..., :1]).all()) or labels.shape[-1] % n_classes:
        raise ValueError("transductive_batch one_per_class needs the same number of query images in every class")
    order = labels.argsort(dim=-1, stable=True)                              # class-major
    return order.view(*labels.shape[:-1], n_classes, -1).transpose(-1, -2)


def _device(params: Params) -> torch.device:
    return next(iter(params.values())).device
