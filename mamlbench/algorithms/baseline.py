"""The fine-tuning baseline of Chen et al. (Baseline, and Baseline++ with `head: cosine`).

Training is ordinary supervised classification of every meta-train class: the network's head has one
output per class of the training split, and each "task" of a meta-batch only contributes its support
and query images with their *global* class indices (`global_labels = True`: `fewshot.train` relabels
the episodes from the sampler's `EpisodeIndex` before the step), so one meta-update is one Adam step on
the mean cross-entropy of one minibatch. There is no inner loop.

At test time the body (`features`) is frozen: the support and query images are embedded, a new head
(linear, or `DistLinear` for Baseline++) is trained on the support features with the reference's SGD
recipe, and it classifies the queries. The head's initialisation and the epochs' shuffles are seeded
from the episode's own support set (a digest of its pixels and labels) and `finetune_seed`, so an
episode gets the same head whatever the chunking or the order of evaluation.

`trajectory` repeats that one prediction for each of the 0..inner_steps "steps" the evaluation asks
for, as ProtoNet's does.

References: Chen, Liu, Kira, Wang & Huang, "A Closer Look at Few-shot Classification", ICLR 2019;
github.com/wyharveychen/CloserLookFewShot (methods/baselinetrain.py, methods/baselinefinetune.py,
backbone.py `distLinear`, train.py).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamlbench import rng
from mamlbench.algorithms.core import LR, split_state, task_batch_norm
from mamlbench.algorithms.maml import MAML, MetaOutput
from mamlbench.algorithms.protonet import embed
from mamlbench.schema import knob

Head = Literal["linear", "cosine"]


@dataclass(frozen=True)
class BaselineParams:
    """The `baseline` section (the test-time values are baselinefinetune.py's `set_forward_adaptation`)."""
    head: Head = knob("linear", "linear: Baseline (nn.Linear, bias 0 at training); cosine: Baseline++ (distLinear: "
                                "scale x cosine similarity to class-wise weight-normalised weights).")
    num_classes: int | None = knob(None, "Outputs of the training head; null: the training split's classes. The "
                                         "reference's --num_classes (io_utils.py:28, default 200) only has to exceed "
                                         "the largest base label; extra outputs are never a target.", ge=1)
    scale_factor: float | None = knob(None, "Baseline++'s logit scale; null: the reference's rule, 2 for a head of "
                                            "<= 200 classes, 10 above (backbone.py distLinear).", gt=0)
    finetune_lr: float = knob(0.01, "SGD step size of the test-time head.", gt=0)
    finetune_momentum: float = knob(0.9, "SGD momentum of the test-time head.", ge=0)
    finetune_dampening: float = knob(0.9, "SGD dampening of the test-time head.", ge=0)
    finetune_weight_decay: float = knob(0.001, "SGD weight decay of the test-time head.", ge=0)
    finetune_batch_size: int = knob(4, "Support examples per SGD step at test time.", ge=1)
    finetune_epochs: int = knob(100, "Passes over the (shuffled) support set at test time.", ge=1)
    finetune_seed: int = knob(0, "Seeds each episode's head initialisation and shuffles (with the episode's "
                                 "support set).")


def reference_scale(n_classes: int) -> float:
    """distLinear's fixed scale: 2 up to 200 outputs, 10 above (backbone.py:30-33)."""
    return 2.0 if n_classes <= 200 else 10.0


def cosine_logits(x: Tensor, g: Tensor, v: Tensor, scale: float) -> Tensor:
    """scale * <x/(|x| + 1e-5), g v/|v|> per class; x (..., n, d), g (..., k, 1), v (..., k, d)."""
    x = x / (x.norm(dim=-1, keepdim=True) + 1e-5)
    w = g * v / v.norm(dim=-1, keepdim=True)   # WeightNorm(dim=0): class-wise direction and learned norm
    return scale * x @ w.transpose(-1, -2)


class DistLinear(nn.Module):
    """Baseline++'s head (backbone.py `distLinear`): a bias-free linear layer under class-wise weight
    normalisation (`weight_g`, `weight_v`, as `WeightNorm.apply(L, 'weight', dim=0)` names them), applied to
    L2-normalised inputs, times a fixed `scale_factor`."""

    def __init__(self, in_features: int, out_features: int, scale_factor: float | None = None):
        super().__init__()
        weight = nn.Linear(in_features, out_features, bias=False).weight.detach()  # nn.Linear's init
        self.weight_v = nn.Parameter(weight.clone())
        self.weight_g = nn.Parameter(weight.norm(dim=1, keepdim=True))
        self.scale_factor = reference_scale(out_features) if scale_factor is None else float(scale_factor)

    def forward(self, x: Tensor) -> Tensor:
        return cosine_logits(x, self.weight_g, self.weight_v, self.scale_factor)


def episode_generator(seed: int, support_x: Tensor, support_y: Tensor) -> torch.Generator:
    """A CPU generator seeded by `seed` and a digest of one episode's support set."""
    digest = hashlib.sha256(support_x.detach().float().cpu().numpy().tobytes())
    digest.update(support_y.detach().cpu().numpy().astype("int64").tobytes())
    return rng.generator(seed, "baseline-finetune", int.from_bytes(digest.digest()[:7], "big"))


def init_head(kind: Head, n_way: int, dim: int, generator: torch.Generator) -> dict[str, Tensor]:
    """nn.Linear's default init, U(-1/sqrt(d), 1/sqrt(d)) for weight and bias (baselinefinetune.py:28; its
    bias is not zeroed); the cosine head's weight_g starts at the rows' norms (WeightNorm's init, :30)."""
    bound = 1 / math.sqrt(dim)
    weight = (torch.rand(n_way, dim, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    if kind == "linear":
        bias = (torch.rand(n_way, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        return {"weight": weight, "bias": bias}
    return {"weight_g": weight.norm(dim=1, keepdim=True), "weight_v": weight}


def head_logits(kind: Head, head: dict[str, Tensor], x: Tensor, scale: float) -> Tensor:
    if kind == "linear":
        return x @ head["weight"].transpose(-1, -2) + head["bias"][..., None, :]
    return cosine_logits(x, head["weight_g"], head["weight_v"], scale)


def finetune(kind: Head, heads: dict[str, Tensor], feats: Tensor, labels: Tensor, orders: Tensor, *,
             lr: float, momentum: float, dampening: float, weight_decay: float, batch_size: int,
             scale: float) -> dict[str, Tensor]:
    """New heads trained on support features, one per task (baselinefinetune.py:33-50).

    Args:
        heads: the initial heads, each entry with a leading tasks dimension.
        feats, labels: (tasks, n, d) frozen support features and (tasks, n) labels.
        orders: (tasks, epochs, n) the permutation of the support set in each epoch.

    Each epoch walks its permutation in batches of `batch_size` (the last one smaller); each batch is one
    step of torch.optim.SGD(lr, momentum, dampening, weight_decay) on the batch's mean cross-entropy,
    one optimiser (momentum buffer) for the whole run. Tasks are independent: the loss summed over tasks
    gives each task's head its own gradient, and SGD's update is elementwise.
    """
    heads = {k: v.detach().clone().to(feats.dtype).requires_grad_(True) for k, v in heads.items()}
    opt = torch.optim.SGD(list(heads.values()), lr=lr, momentum=momentum, dampening=dampening,
                          weight_decay=weight_decay)
    n = feats.shape[1]
    with torch.enable_grad():
        for epoch in range(orders.shape[1]):
            for i in range(0, n, batch_size):
                pick = orders[:, epoch, i:i + batch_size]                                   # (tasks, b)
                x = feats.gather(1, pick[..., None].expand(-1, -1, feats.shape[-1]))         # (tasks, b, d)
                y = labels.gather(1, pick)
                logits = head_logits(kind, heads, x, scale)
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
                opt.zero_grad()
                loss.mean(1).sum().backward()
                opt.step()
    return {k: v.detach() for k, v in heads.items()}


class Baseline(MAML):
    """Chen et al.'s Baseline / Baseline++ around `model` = head(features(x)) (see the module docstring).

    Args:
        model: a network whose `head` is an nn.Linear; its output size is the number of training
            classes (`fewshot.build_learner` builds it so). The head is replaced at construction, with
            `num_classes` outputs when given: nn.Linear's init with a zero bias (baselinetrain.py:15-16), or
            `DistLinear` (:17-18).
        loss_fn: the training loss on (logits, global labels): mean cross-entropy (baselinetrain.py:21).
        head, scale_factor, finetune_*: see `BaselineParams`.
        inner_lr, inner_steps, strategy: accepted for a uniform constructor; there is no inner loop.

    Example:
        learner = Baseline(build_model("conv4_omniglot", n_way=4800), head="cosine")
        out = learner(support_x, support_y_global, query_x, query_y_global)
        opt.zero_grad(); out.loss.backward(); opt.step()
    """

    global_labels = True  # fewshot.train passes each image's class index in the training split

    def __init__(self, model: nn.Module, inner_lr: float = 0.0, inner_steps: int = 0, strategy: str = "auto",
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy, head: Head = "linear",
                 num_classes: int | None = None, scale_factor: float | None = None, finetune_lr: float = 0.01, finetune_momentum: float = 0.9,
                 finetune_dampening: float = 0.9, finetune_weight_decay: float = 0.001, finetune_batch_size: int = 4,
                 finetune_epochs: int = 100, finetune_seed: int = 0):
        super().__init__(model, inner_lr, inner_steps, first_order=True, strategy=strategy, loss_fn=loss_fn)
        old = getattr(model, "head", None)
        if not isinstance(old, nn.Linear) or not isinstance(getattr(model, "features", None), nn.Module):
            raise ValueError("Baseline: the model must be head(features(x)) with an nn.Linear head")
        outputs = old.out_features if num_classes is None else num_classes
        if outputs < old.out_features:
            raise ValueError(f"Baseline: num_classes = {num_classes} is fewer than the {old.out_features} training classes")
        if head == "linear":
            new = nn.Linear(old.in_features, outputs)
            nn.init.zeros_(new.bias)
        elif head == "cosine":
            new = DistLinear(old.in_features, outputs, scale_factor)
        else:
            raise ValueError(f"Baseline: head must be linear or cosine, got {head!r}")
        model.head = new.to(old.weight.device, old.weight.dtype)
        self.kind, self.scale_factor, self.feat_dim = head, scale_factor, old.in_features
        self.finetune_options = dict(lr=finetune_lr, momentum=finetune_momentum, dampening=finetune_dampening,
                                     weight_decay=finetune_weight_decay, batch_size=finetune_batch_size)
        self.finetune_epochs, self.finetune_seed = finetune_epochs, finetune_seed

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> MetaOutput:
        """One supervised minibatch: every task's support and query images, labelled as given (global
        classes in training), through the whole network at once; the loss is `loss_fn` over all of them."""
        tasks, n_support = support_y.shape
        x = torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)])
        y = torch.cat([support_y.flatten(), query_y.flatten()])
        with task_batch_norm(self.model, batched=False):   # the minibatch's statistics
            logits = self.model(x)
        loss = self.loss_fn(logits, y)
        query_out = logits[tasks * n_support:].view(tasks, query_y.shape[1], -1)
        task_losses = F.cross_entropy(query_out.detach().flatten(0, 1), query_y.flatten(),
                                      reduction="none").view(query_y.shape).mean(1)
        return MetaOutput(loss, task_losses, query_out.detach())

    def episode_head(self, n_way: int, support_x: Tensor, support_y: Tensor,
                     epochs: int) -> tuple[dict[str, Tensor], Tensor]:
        """(initial head, (epochs, n_support) shuffles) of one episode, from its own generator."""
        g = episode_generator(self.finetune_seed, support_x, support_y)
        head = init_head(self.kind, n_way, self.feat_dim, g)
        n = support_y.shape[0]
        return head, torch.stack([torch.randperm(n, generator=g) for _ in range(epochs)])

    @torch.no_grad()
    def query_logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """(tasks, n_query, n_way): the fine-tuned new heads' logits on the queries, the body frozen."""
        params, buffers = split_state(self.model)
        n_way, n_support = int(support_y.max()) + 1, support_x.shape[1]
        with task_batch_norm(self.model, batched=False):   # per episode: its support and query in one batch
            z = torch.stack([embed(self.model, params, buffers, torch.cat([sx, qx]))
                             for sx, qx in zip(support_x, query_x)])
        inits = [self.episode_head(n_way, sx, sy, self.finetune_epochs) for sx, sy in zip(support_x, support_y)]
        heads = {k: torch.stack([h[k] for h, _ in inits]).to(z) for k in inits[0][0]}
        orders = torch.stack([o for _, o in inits]).to(z.device)
        scale = reference_scale(n_way) if self.scale_factor is None else float(self.scale_factor)
        heads = finetune(self.kind, heads, z[:, :n_support], support_y, orders, scale=scale, **self.finetune_options)
        return head_logits(self.kind, heads, z[:, n_support:], scale)

    @torch.no_grad()
    def trajectory(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                   inner_steps: int, metric: Callable[[Tensor, Tensor], Tensor] | None = None,
                   inner_lr: LR | None = None) -> Tensor:
        """(tasks, inner_steps + 1): the query metric of the fine-tuned head, the same at every step."""
        metric = metric or self.loss_fn
        outs = self.query_logits(support_x, support_y, query_x)
        values = torch.stack([metric(o, y) for o, y in zip(outs, query_y)])
        return values[:, None].expand(-1, inner_steps + 1).clone()
