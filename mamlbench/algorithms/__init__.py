"""MAML-family algorithms, selected by name: `build_algorithm("anil", model, inner_lr=0.4, inner_steps=1)`.

Every algorithm is an `nn.Module` whose `forward(support_x, support_y, query_x, query_y)` returns a
`MetaOutput`; `out.loss.backward(); opt.step()` is one meta-update, whatever the algorithm. Each
variant's own knobs live in its params dataclass (`PARAMS[name]`, None when it has none), whose
fields are the constructor's keyword arguments.

| name      | class           | paper                     | params section  |
|-----------|-----------------|---------------------------|-----------------|
| maml      | MAML            | Finn et al. 2017          | -               |
| fomaml    | MAML (1st ord.) | Finn et al. 2017          | -               |
| reptile   | Reptile         | Nichol et al. 2018        | ReptileParams   |
| anil      | ANIL            | Raghu et al. 2020         | ANILParams      |
| metasgd   | MetaSGD         | Li et al. 2017            | MetaSGDParams   |
| mamlpp    | MAMLPlusPlus    | Antoniou et al. 2019      | MAMLPPParams    |
| boil      | BOIL            | Oh et al. 2021            | BOILParams      |
| protonet  | ProtoNet        | Snell et al. 2017         | ProtoNetParams  |
| protomaml | ProtoMAML       | Triantafillou et al. 2020 | ProtoMAMLParams |
| cavia     | CAVIA           | Zintgraf et al. 2019      | CAVIAParams     |
| imaml     | IMAML           | Rajeswaran et al. 2019    | IMAMLParams     |
| baseline  | Baseline        | Chen et al. 2019          | BaselineParams  |
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from mamlbench.algorithms.anil import ANIL, ANILParams
from mamlbench.algorithms.baseline import Baseline, BaselineParams
from mamlbench.algorithms.boil import BOIL, BOILParams
from mamlbench.algorithms.cavia import CAVIA, CAVIAParams
from mamlbench.algorithms.core import norm_parameter_names
from mamlbench.algorithms.imaml import IMAML, IMAMLParams
from mamlbench.algorithms.maml import FOMAML, MAML, PRECISIONS, MetaOutput, check_precision
from mamlbench.algorithms.mamlpp import MAMLPlusPlus, MAMLPPParams
from mamlbench.algorithms.metasgd import MetaSGD, MetaSGDParams
from mamlbench.algorithms.protomaml import ProtoMAML, ProtoMAMLParams
from mamlbench.algorithms.protonet import ProtoNet, ProtoNetParams
from mamlbench.algorithms.reptile import Reptile, ReptileParams
from mamlbench.schema import build

ALGORITHMS: dict[str, Callable[..., MAML]] = {
    "maml": MAML,
    "fomaml": FOMAML,
    "reptile": Reptile,
    "anil": ANIL,
    "metasgd": MetaSGD,
    "mamlpp": MAMLPlusPlus,
    "boil": BOIL,
    "protonet": ProtoNet,
    "protomaml": ProtoMAML,
    "cavia": CAVIA,
    "imaml": IMAML,
    "baseline": Baseline,
}

PARAMS: dict[str, type | None] = {
    "maml": None,
    "fomaml": None,
    "reptile": ReptileParams,
    "anil": ANILParams,
    "metasgd": MetaSGDParams,
    "mamlpp": MAMLPPParams,
    "boil": BOILParams,
    "protonet": ProtoNetParams,
    "protomaml": ProtoMAMLParams,
    "cavia": CAVIAParams,
    "imaml": IMAMLParams,
    "baseline": BaselineParams,
}


def build_algorithm(name: str, model: nn.Module, *, inner_lr: float, inner_steps: int, strategy: str = "auto",
                    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                    params: Any = None, precision: str = "fp32", adapt_norm: bool = True) -> MAML:
    """The learner `name` around `model`.

    Args:
        name: a key of `ALGORITHMS`.
        model: the network whose initialisation is meta-learned.
        inner_lr, inner_steps, strategy, loss_fn: shared by every algorithm (see `MAML`).
        params: the variant's section: its dataclass, a mapping validated into it (`ConfigError`
            on a bad key or value, named `<name>.<key>`), or None for its defaults.
        precision: "fp32" or "bf16" (autocast of the inner loop and query pass; see `MAML`).
        adapt_norm: False leaves the normalisation layers' parameters out of the inner loop (the
            original MAML code: its BatchNorm variables are not in `weights`), so only the outer loop
            learns them.

    Example:
        learner = build_algorithm("mamlpp", model, inner_lr=0.1, inner_steps=5,
                                  params={"lslr": True, "per_step_bn_stats": False})
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(ALGORITHMS)})")
    section = PARAMS[name]
    if section is None:
        if params:
            raise ValueError(f"algorithm {name!r} takes no params section, got {params!r}")
        kwargs: dict[str, Any] = {}
    else:
        if params is None or isinstance(params, Mapping):
            params = build(section, dict(params or {}), name)
        elif not isinstance(params, section):
            raise ValueError(f"params for {name!r} must be a {section.__name__} or a mapping, "
                             f"got {type(params).__name__}")
        kwargs = dataclasses.asdict(params)
    learner = ALGORITHMS[name](model, inner_lr=inner_lr, inner_steps=inner_steps, strategy=strategy,
                               loss_fn=loss_fn, **kwargs)
    learner.precision = check_precision(precision)  # an attribute: the variants' constructors do not take it
    if not adapt_norm:
        learner.inner_frozen = frozenset(norm_parameter_names(model))
    return learner


__all__ = ["ALGORITHMS", "PARAMS", "PRECISIONS", "build_algorithm", "MetaOutput", "MAML", "FOMAML", "Reptile", "ANIL",
           "MetaSGD", "MAMLPlusPlus", "BOIL", "ANILParams", "MetaSGDParams", "MAMLPPParams", "ReptileParams",
           "BOILParams", "ProtoNet", "ProtoNetParams", "ProtoMAML", "ProtoMAMLParams", "CAVIA", "CAVIAParams",
           "IMAML", "IMAMLParams", "Baseline", "BaselineParams"]
