"""mamlbench: MAML-family meta-learning on any nn.Module, with the paper's benchmarks.

    from mamlbench import MAML
    maml = MAML(model, inner_lr=0.4, inner_steps=1)
    out = maml(support_x, support_y, query_x, query_y)   # leading dimension: tasks
    out.loss.backward()                                   # the meta-gradient
"""
from mamlbench.algorithms import ALGORITHMS, build_algorithm
from mamlbench.algorithms.maml import FOMAML, MAML, MetaOutput

__all__ = ["MAML", "FOMAML", "MetaOutput", "ALGORITHMS", "build_algorithm"]
