"""Prototypical Networks: classify a query by its squared distance to each class's mean support embedding.

No inner loop. A task is learned by averaging its support embeddings into one prototype per class,
c_k = mean_{i: y_i = k} f(x_i) (Snell et al., eq. 1), and a query's logits are -||f(x) - c_k||^2
(eq. 2, the squared Euclidean distance, which section 2.4 shows makes the classifier linear in
f(x)). Only the embedding f is meta-learned, by the query loss through the prototypes.

The embedding is the model's `features` (the network without its linear head, which goes unused),
or the whole model when it has none. Support and query images go through f in one batch, as the
reference code's `Protonet.loss` does (`torch.cat([xs, xq])`): one set of BatchNorm statistics.

`forward` returns MAML's `MetaOutput`, so the training loop is unchanged; `trajectory` repeats the
one prediction for each of the 0..inner_steps "steps" the evaluation asks for.

References: Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017;
github.com/jakesnell/prototypical-networks (protonets/models/few_shot.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamlbench.algorithms.core import LR, Params, forward, split_state, sub_state, task_batch_norm
from mamlbench.algorithms.maml import MAML, MetaOutput
from mamlbench.schema import knob


@dataclass(frozen=True)
class ProtoNetParams:
    """The `protonet` section."""
    lr_halve_every: int | None = knob(2000, "Halve the meta learning rate every this many meta-updates (Snell et "
                                            "al., section 3.1: every 2000 episodes); null: constant.", ge=1)


def prototypes(embeddings: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """(n_way, d): the mean embedding of each class (a one-hot average, so it runs under vmap)."""
    onehot = (labels[:, None] == torch.arange(n_way, device=labels.device)).to(embeddings.dtype)
    return onehot.T @ embeddings / onehot.sum(0)[:, None]


def squared_distances(queries: Tensor, protos: Tensor) -> Tensor:
    """(n_query, n_way): ||q - c_k||^2."""
    return ((queries[:, None, :] - protos[None]) ** 2).sum(-1)


def embed(model: nn.Module, params: Params, buffers: Params, x: Tensor) -> Tensor:
    """f(x): `model.features` when the model has one, else the model itself."""
    if isinstance(getattr(model, "features", None), nn.Module):
        return forward(model.features, sub_state(params, "features"), sub_state(buffers, "features"), x)
    return forward(model, params, buffers, x)


class ProtoNet(MAML):
    """Prototypical Networks around `model`'s embedding (see the module docstring).

    Args:
        model: `head(features(x))` (the head is unused) or any embedding network.
        loss_fn: loss(logits, targets) on the query set; logits are -squared distances.
        strategy: "vmap" batches the tasks, "loop" runs them one by one ("auto": per device, as MAML).
        lr_halve_every: see `ProtoNetParams` (`meta_lr`, read by the training loop).
        inner_lr, inner_steps: accepted for a uniform constructor; there is no inner loop.

    References: Snell et al., NeurIPS 2017 (section 2.2, eq. 1-2).

    Example:
        learner = ProtoNet(build_model("conv4_omniglot", n_way=5))
        out = learner(support_x, support_y, query_x, query_y)
        opt.zero_grad(); out.loss.backward(); opt.step()
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.0, inner_steps: int = 0, strategy: str = "auto",
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy, lr_halve_every: int | None = 2000):
        super().__init__(model, inner_lr, inner_steps, first_order=True, strategy=strategy, loss_fn=loss_fn)
        self.lr_halve_every = lr_halve_every

    def meta_lr(self, iteration: int, total_iterations: int, base_lr: float) -> float:
        """Adam's step size, halved every `lr_halve_every` meta-updates (Snell et al., section 3.1)."""
        return base_lr if self.lr_halve_every is None else base_lr * 0.5 ** (iteration // self.lr_halve_every)

    def logits(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
               n_way: int) -> Tensor:
        """-||f(x_query) - c_k||^2 for one task."""
        z = embed(self.model, params, buffers, torch.cat([support_x, query_x]))
        protos = prototypes(z[:support_x.shape[0]], support_y, n_way)
        return -squared_distances(z[support_x.shape[0]:], protos)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> MetaOutput:
        """Mean query loss of the prototype classifiers over a batch of tasks (leading dimension)."""
        params, buffers = split_state(self.model)
        n_way = int(support_y.max()) + 1  # labels 0..N-1 (outside vmap: a Python int)

        def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            out = self.logits(params, buffers, sx, sy, qx, n_way)
            return self.loss_fn(out, qy), out

        batched = self.resolve_strategy(support_x.device) in ("vmap", "compiled")
        with task_batch_norm(self.model, batched=batched):
            if batched:
                losses, outs = torch.func.vmap(one, randomness="different")(support_x, support_y, query_x, query_y)
            else:
                losses, outs = map(torch.stack, zip(*[one(*t) for t in zip(support_x, support_y, query_x, query_y)]))
        return MetaOutput(losses.mean(), losses.detach(), outs.detach())

    @torch.no_grad()
    def trajectory(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                   inner_steps: int, metric: Callable[[Tensor, Tensor], Tensor] | None = None,
                   inner_lr: LR | None = None) -> Tensor:
        """(tasks, inner_steps + 1): the query metric of the prototype classifier, the same at every step."""
        metric = metric or self.loss_fn
        outs = self(support_x, support_y, query_x, query_y).query_outputs
        values = torch.stack([metric(o, y) for o, y in zip(outs, query_y)])
        return values[:, None].expand(-1, inner_steps + 1).clone()
