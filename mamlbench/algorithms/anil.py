"""ANIL (Almost No Inner Loop): MAML whose inner loop adapts the head only.

The body's parameters pass through the inner loop unchanged, yet they are still meta-learned: the
query loss of the adapted head depends on the body through the features, so the meta-gradient
reaches it (second order through the head's inner steps, unless `first_order`). Raghu et al. show
this matches MAML's accuracy, evidence that MAML mostly reuses features rather than adapting them.

Because the body is fixed within a task, a model that is `head(features(x))` (every model in
`mamlbench.models.conv`) gets its support features computed once per task: each inner step then
costs a pass through the head alone. Any other model works too, at the cost of a full forward per
step, with the head named by its parameter prefix.

References: Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards
Understanding the Effectiveness of MAML", ICLR 2020.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from mamlbench.algorithms.core import Params, forward, sub_state
from mamlbench.algorithms.maml import MAML
from mamlbench.schema import knob


@dataclass(frozen=True)
class ANILParams:
    """The `anil` section: what ANIL adds to MAML."""
    head: str = knob("head", "Submodule adapted in the inner loop; every other parameter is the body.")
    first_order: bool = knob(False, "Drop the second-order term of the head's inner steps.")


def head_parameter_names(model: nn.Module, head: str, variant: str) -> list[str]:
    """The trainable parameters under `head.`; ValueError naming the model's parameters when there are none."""
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    heads = [k for k in names if k.startswith(head + ".")]
    if not heads:
        raise ValueError(f"{variant}: the model has no trainable parameters under head {head!r} "
                         f"(parameters: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
    return heads


class ANIL(MAML):
    """MAML with the inner loop restricted to the parameters under `head`.

    Args:
        model, inner_lr, inner_steps, first_order, strategy, loss_fn: as `MAML`.
        head: name of the submodule adapted per task (its parameters are those named `head.*`).
            With a `features` submodule too, the model must compute `head(features(x))`.

    References: Raghu et al., ICLR 2020 (section 4).

    Example:
        learner = ANIL(build_model("conv4_omniglot", n_way=5), inner_lr=0.4, inner_steps=1)
        out = learner(support_x, support_y, query_x, query_y)
        opt.zero_grad(); out.loss.backward(); opt.step()     # body and head both move
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = False,
                 strategy: str = "auto", loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 head: str = "head"):
        super().__init__(model, inner_lr, inner_steps, first_order, strategy, loss_fn)
        self.head = head
        head_parameter_names(model, head, "ANIL")
        # The cached-features path needs the model to be exactly head(features(x)).
        self.split = head == "head" and isinstance(getattr(model, "features", None), nn.Module)

    def adapts(self, name: str) -> bool:
        return name.startswith(self.head + ".")

    def support_loss(self, params: Params, buffers: Params, support_x: Tensor,
                     support_y: Tensor) -> Callable[[Params], Tensor]:
        """With `head(features(x))`, the features are a function of the body: computed once per task."""
        if not self.split:
            return super().support_loss(params, buffers, support_x, support_y)
        # (n_support, n_features): a function of the body only, reused by every inner step.
        feats = forward(self.model.features, sub_state(params, "features"), sub_state(buffers, "features"), support_x)
        head_buffers = sub_state(buffers, "head")
        return lambda head: self.loss_fn(forward(self.model.head, sub_state(head, "head"), head_buffers, feats), support_y)
