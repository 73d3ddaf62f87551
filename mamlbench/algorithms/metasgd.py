"""Meta-SGD: MAML that also meta-learns one inner learning rate per parameter entry.

The inner step becomes theta' = theta - alpha * grad with alpha a tensor of theta's shape
(element-wise product), meta-learned with theta by the same outer optimiser. alpha learns both a
step size and a direction per entry, and may turn negative. Only `inner_lrs` differs from MAML.

References: Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
arXiv:1707.09835, 2017.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamlbench.algorithms.core import LR, split_state
from mamlbench.algorithms.maml import MAML
from mamlbench.schema import knob


@dataclass(frozen=True)
class MetaSGDParams:
    """The `metasgd` section: what Meta-SGD adds to MAML."""
    init_inner_lr: float | None = knob(None, "Initial value of every learned inner rate alpha; null: each entry "
                                             "drawn from U(init_range), as Li et al.", gt=0)
    init_range: list[float] = knob([0.005, 0.1], "Li et al.'s range of the random initial rates (section 4.1).",
                                   gt=0)
    first_order: bool = knob(False, "Drop the second-order term; alpha still gets its (first-order) gradient.")


def param_key(name: str) -> str:
    """`nn.ParameterDict` keys may not contain dots: 'features.0.weight' -> 'features__0__weight'."""
    return name.replace(".", "__")


class MetaSGD(MAML):
    """MAML with learned per-parameter inner learning rates `lrs` (an `nn.ParameterDict`).

    Args:
        model, inner_steps, strategy, loss_fn: as `MAML`.
        inner_lr: step size the rates start from, unless `init_inner_lr` is given.
        init_inner_lr: initial value of every alpha entry (a constant keeps Meta-SGD equal to MAML
            at initialisation); None: each entry drawn from U(init_range) with the global RNG, as
            Li et al. (section 4.1: "randomly initialized from [0.005, 0.1]").
        init_range: (low, high) of that draw.
        first_order: as `MAML`.

    References: Li et al., 2017 (section 3, eq. 2).

    Example:
        learner = MetaSGD(model, inner_lr=0.4, inner_steps=1)
        opt = torch.optim.Adam(learner.parameters(), lr=1e-3)   # the model's weights and `lrs`
        out = learner(support_x, support_y, query_x, query_y)
        opt.zero_grad(); out.loss.backward(); opt.step()
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = False,
                 strategy: str = "auto", loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 init_inner_lr: float | None = None, init_range: tuple[float, float] | list[float] = (0.005, 0.1)):
        super().__init__(model, inner_lr, inner_steps, first_order, strategy, loss_fn)
        low, high = init_range
        if not 0 < low <= high:
            raise ValueError(f"init_range must be 0 < low <= high, got {list(init_range)}")
        params, _ = split_state(model)

        def init(p: Tensor) -> Tensor:
            if init_inner_lr is not None:
                return torch.full_like(p, init_inner_lr)
            return torch.empty_like(p).uniform_(low, high)
        # Registered on the learner, so `self.parameters()` (and the loop strategy's per-task
        # backward) hands the rates to the meta-optimiser with the weights.
        self.lrs = nn.ParameterDict({param_key(k): nn.Parameter(init(p.detach())) for k, p in params.items()})
        self._names = list(params)

    def inner_lrs(self) -> LR:
        return {k: self.lrs[param_key(k)] for k in self._names}
