"""CAVIA (fast context adaptation): the inner loop adapts a context vector only; the network is meta-learned.

Each task starts from a zero context phi (Zintgraf et al.; the reference's `reset_context_params`);
the inner steps move phi alone, phi' = phi - alpha grad_phi L_support, and the outer loop learns
every network weight from the query loss after them (second order through phi's steps unless
`first_order`). Few parameters adapt per task, so the inner loop cannot overfit the support set.

For classification the context modulates one convolutional layer through FiLM (Zintgraf et al.'s
classification experiments and the reference's `CondConvNet`): a linear layer maps phi to a per-channel scale and
shift, h -> gamma(phi) * h + beta(phi), applied to the output of one submodule (`context_at`; the
reference code's default is the third conv block, after its BatchNorm, before the ReLU). Regression
feeds phi as extra inputs instead; that variant is not built here.

References: Zintgraf, Shiarlis, Kurin, Hofmann & Whiteson, "Fast Context Adaptation via
Meta-Learning", ICML 2019; github.com/lmzintgraf/cavia (classification/models.py, cavia.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamlbench.algorithms.core import Params
from mamlbench.algorithms.maml import MAML
from mamlbench.schema import knob


@dataclass(frozen=True)
class CAVIAParams:
    """The `cavia` section: what CAVIA adds to MAML."""
    num_context_params: int = knob(100, "Size of the context vector phi (the reference's default).", ge=1)
    context_at: str = knob("features.2.1", "Submodule of the network whose output FiLM modulates; the conv4 "
                                           "models' third block's BatchNorm (the reference's context_in: layer 3).")
    first_order: bool = knob(False, "Drop the second-order term of the context's inner steps.")


def _channels(layer: nn.Module) -> int:
    for attr in ("num_features", "out_channels", "out_features"):
        if isinstance(getattr(layer, attr, None), int):
            return getattr(layer, attr)
    raise ValueError(f"CAVIA: cannot tell how many channels {type(layer).__name__} outputs (FiLM needs a "
                     f"BatchNorm, convolution or linear layer)")


class ContextNet(nn.Module):
    """`net` with FiLM from `context` on the output of `net.<at>`: h -> gamma * h + beta, (gamma, beta) = film(context).

    `context` is a parameter so that `functional_call` can swap in each task's value; CAVIA replaces
    it by zeros in every task, so it never receives a meta-gradient and stays zero.
    """

    def __init__(self, net: nn.Module, num_context_params: int, at: str):
        super().__init__()
        try:
            layer = net.get_submodule(at)
        except AttributeError:
            raise ValueError(f"CAVIA: the network has no submodule {at!r} for the context (context_at)") from None
        like = next(net.parameters())  # FiLM and the context in the network's dtype and device
        self.net = net
        self.film = nn.Linear(num_context_params, 2 * _channels(layer), dtype=like.dtype, device=like.device)
        self.context = nn.Parameter(torch.zeros(num_context_params, dtype=like.dtype, device=like.device))
        layer.register_forward_hook(self._film)

    def _film(self, module: nn.Module, inputs, h: Tensor) -> Tensor:
        gamma, beta = self.film(self.context).chunk(2)
        shape = (1, -1) + (1,) * (h.dim() - 2)
        return gamma.view(shape) * h + beta.view(shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CAVIA(MAML):
    """MAML whose inner loop adapts only a zero-initialised, per-task context vector.

    Args:
        model: the network; it is wrapped in a `ContextNet` (`self.model.net`), which adds `film`.
        inner_lr, inner_steps, first_order, strategy, loss_fn: as `MAML`.
        num_context_params, context_at: see `CAVIAParams`.

    References: Zintgraf et al., ICML 2019 (classification with FiLM); lmzintgraf/cavia.

    Example:
        learner = CAVIA(build_model("conv4_miniimagenet", n_way=5), inner_lr=1.0, inner_steps=2)
        out = learner(support_x, support_y, query_x, query_y)
        opt.zero_grad(); out.loss.backward(); opt.step()     # the network and FiLM move; phi stays 0
    """

    def __init__(self, model: nn.Module, inner_lr: float = 1.0, inner_steps: int = 2, first_order: bool = False,
                 strategy: str = "auto", loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 num_context_params: int = 100, context_at: str = "features.2.1"):
        super().__init__(ContextNet(model, num_context_params, context_at), inner_lr, inner_steps, first_order,
                         strategy, loss_fn)

    def adapts(self, name: str) -> bool:
        return name == "context"

    def steps(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor, n_steps: int, *,
              batched: bool, **kwargs) -> Iterator[Params]:
        """MAML's inner loop over the context, from zeros in every task (never from a learned value)."""
        zero = torch.zeros_like(params["context"].detach())
        if not batched:  # autograd.grad differentiates w.r.t. it; torch.func.grad needs (and allows) no flag
            zero.requires_grad_()
        yield from super().steps({**params, "context": zero}, buffers, support_x, support_y, n_steps,
                                 batched=batched, **kwargs)
