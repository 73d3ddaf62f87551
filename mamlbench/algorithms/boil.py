"""BOIL (Body Only update in Inner Loop): MAML whose inner loop adapts the body and freezes the head.

ANIL's mirror image. The head's inner learning rate is zero (Oh et al.: alpha_h = 0, alpha_b > 0),
so within a task the classifier's weight vectors stay where meta-training put them and the
*features* must move towards them: representation change rather than reuse. The head is still
meta-learned: the query loss reaches it directly, and through the body's inner steps (second order).

References: Oh, Yoo, Kim & Yun, "BOIL: Towards Representation Change for Few-shot Learning",
ICLR 2021 (the BOIL update: the inner loop's head learning rate is zero).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from mamlbench.algorithms.anil import head_parameter_names
from mamlbench.algorithms.maml import MAML
from mamlbench.schema import knob


@dataclass(frozen=True)
class BOILParams:
    """The `boil` section: what BOIL adds to MAML."""
    head: str = knob("head", "Submodule frozen in the inner loop (meta-learned only); every other parameter is "
                             "the body, adapted.")
    first_order: bool = knob(False, "Drop the second-order term of the body's inner steps.")


class BOIL(MAML):
    """MAML with the parameters under `head` left out of the inner loop.

    Args:
        model, inner_lr, inner_steps, first_order, strategy, loss_fn: as `MAML`.
        head: name of the submodule kept fixed within a task (`head.*`); all other parameters adapt.

    References: Oh et al., ICLR 2021.

    Example:
        learner = BOIL(build_model("conv4_omniglot", n_way=5), inner_lr=0.4, inner_steps=1)
        opt.zero_grad(); learner(support_x, support_y, query_x, query_y).loss.backward(); opt.step()
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = False,
                 strategy: str = "auto", loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 head: str = "head"):
        super().__init__(model, inner_lr, inner_steps, first_order, strategy, loss_fn)
        self.head = head
        if len(head_parameter_names(model, head, "BOIL")) == sum(p.requires_grad for p in model.parameters()):
            raise ValueError(f"BOIL: every trainable parameter is under head {head!r}: no body to adapt")

    def adapts(self, name: str) -> bool:
        return super().adapts(name) and not name.startswith(self.head + ".")
