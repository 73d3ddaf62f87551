"""Proto-MAML: MAML whose linear head starts each task as the Prototypical Network of its support set.

Before the inner loop, the head is set from the class prototypes c_k (mean support embeddings):
W_k = 2 c_k, b_k = -||c_k||^2. Then -||f(x) - c_k||^2 = W_k f(x) + b_k - ||f(x)||^2, and the last
term is the same for every class, so at step 0 the softmax is exactly ProtoNet's; the inner steps
then fine-tune head and body as MAML does. The prototypes are a function of the body, so the
meta-gradient flows through the head's initialisation into the embedding. The meta-learned head
itself is never used (it is replaced in every task).

Only `steps` differs from MAML: it swaps the head for the prototype head before stepping, so
training (`forward`) and evaluation (`trajectory`) start from the same initialisation.

References: Triantafillou et al., "Meta-Dataset: A Dataset of Datasets for Learning to Learn from
Few Examples", ICLR 2020 (Proto-MAML; its experiments run the first-order variant, fo-Proto-MAML).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from mamlbench.algorithms.core import Params, forward, sub_state
from mamlbench.algorithms.maml import MAML
from mamlbench.algorithms.protonet import prototypes
from mamlbench.schema import knob


@dataclass(frozen=True)
class ProtoMAMLParams:
    """The `protomaml` section: what Proto-MAML adds to MAML."""
    first_order: bool = knob(True, "First-order inner steps (fo-Proto-MAML, the variant Triantafillou et al. "
                                   "evaluate); the prototype initialisation stays differentiable either way.")


class ProtoMAML(MAML):
    """MAML with the head initialised per task from the support prototypes.

    Args:
        model: `head(features(x))` with `head` an `nn.Linear` (every model in `mamlbench.models.conv`).
        inner_lr, inner_steps, first_order, strategy, loss_fn: as `MAML`.

    References: Triantafillou et al., ICLR 2020.

    Example:
        learner = ProtoMAML(build_model("conv4_omniglot", n_way=5), inner_lr=0.4, inner_steps=1)
        out = learner(support_x, support_y, query_x, query_y)
        opt.zero_grad(); out.loss.backward(); opt.step()
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = True,
                 strategy: str = "auto", loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy):
        super().__init__(model, inner_lr, inner_steps, first_order, strategy, loss_fn)
        if not (isinstance(getattr(model, "features", None), nn.Module) and isinstance(getattr(model, "head", None),
                                                                                       nn.Linear)):
            raise ValueError("ProtoMAML needs a model computing head(features(x)) with head an nn.Linear")

    def prototype_head(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor) -> Params:
        """`params` with the head replaced by W_k = 2 c_k, b_k = -||c_k||^2 (differentiable in the body)."""
        z = forward(self.model.features, sub_state(params, "features"), sub_state(buffers, "features"), support_x)
        c = prototypes(z, support_y, params["head.weight"].shape[0])
        return {**params, "head.weight": 2 * c, "head.bias": -(c ** 2).sum(-1)}

    def steps(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor, n_steps: int, *,
              batched: bool, **kwargs) -> Iterator[Params]:
        """MAML's inner loop from the prototype head.

        Always through `torch.func.grad` (`batched=True`): it treats the head as a variable of its
        own, whereas `autograd.grad` would also differentiate the support loss through the
        prototypes into the body (and free their graph before the meta-gradient needs it).
        """
        yield from super().steps(self.prototype_head(params, buffers, support_x, support_y), buffers, support_x,
                                 support_y, n_steps, batched=True, **kwargs)
