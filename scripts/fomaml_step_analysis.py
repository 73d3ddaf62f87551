"""How big the inner step is, and how far first-order MAML's meta-gradient is from MAML's, on training tasks.

The ablation's accuracies say *that* first-order MAML fails at the quick protocol's step; this says
*why*: first order drops the Jacobian (I - alpha * H) of the inner step, which is harmless when the
step is small against the weights and the curvature, and not otherwise. For the fresh init of a
profile and for each trained run's final model, on 64 training tasks drawn with a fixed generator:

- the cosine and norm ratio between the first-order and the second-order meta-gradient of the
  64-task batch (what Adam follows), and their mean per-task cosine over the first 8 tasks;
- the adapted step's size ||theta' - theta|| / ||theta|| over the adapted tensors, and per tensor,
  and the mean-CE support and query losses before and after it (16 tasks);

at the profile's own step and at a 5x smaller one (alpha / 5 under the same loss reduction).

usage: python scripts/fomaml_step_analysis.py PARAMS PROFILE PREPARED [RUN_DIR ...]  > out.json
(one torch thread; run it with the code the runs were trained with on PYTHONPATH)
"""
import dataclasses
import json
import sys

import torch
import torch.nn.functional as F

from mamlbench.algorithms.core import forward, split_state, task_batch_norm
from mamlbench.config import fewshot_cell, load_params
from mamlbench.data.prepared import load_split
from mamlbench.data.sampler import EpisodeSampler
from mamlbench.fewshot import build_learner
from mamlbench.io import load_torch

TASKS, PER_TASK, STEP_TASKS = 64, 8, 16


def main(params_path: str, profile: str, prepared: str, runs: list[str]) -> None:
    torch.set_num_threads(1)
    params = load_params(params_path, profile=profile, seed=0)
    cell = fewshot_cell(params, "omniglot", "fomaml", "5w1s")
    setting = params.omniglot.settings["5w1s"]
    split = load_split(prepared, "train")
    sampler = EpisodeSampler.from_split(split, setting.n_way, setting.k_shot, cell.train.n_query,
                                        device=torch.device("cpu"))
    sampler.generator.manual_seed(12345)
    batch = sampler.gather(sampler.indices(TASKS), False)
    tasks = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)

    def learner(state, algorithm, inner_lr):
        train = dataclasses.replace(cell.train, inner_lr=inner_lr, strategy="loop")
        out = build_learner(params, "omniglot", algorithm, "5w1s", dataclasses.replace(cell, train=train),
                            split.images.shape[2], split.images.shape[3])
        if state is not None:
            out.load_state_dict(state)
        return out

    def meta_grad(lrn, t=None):
        lrn.zero_grad(set_to_none=True)
        lrn(*(x if t is None else x[t:t + 1] for x in tasks)).loss.backward()
        return torch.cat([p.grad.flatten() for p in lrn.parameters() if p.grad is not None])

    def report(name, state):
        out = {"model": name}
        for label, alpha in (("train step", cell.train.inner_lr), ("5x smaller step", cell.train.inner_lr / 5)):
            fo, so = learner(state, "fomaml", alpha), learner(state, "maml", alpha)
            g1, g2 = meta_grad(fo), meta_grad(so)
            per_task = [F.cosine_similarity(meta_grad(fo, t), meta_grad(so, t), dim=0).item() for t in range(PER_TASK)]
            params_, buffers = split_state(fo.model)
            names = [k for k in params_ if fo.adapts(k)]
            rel, per_tensor, losses = [], {k: [] for k in names}, {k: [] for k in ("sb", "sa", "qb", "qa")}
            with task_batch_norm(fo.model, batched=False):
                for t in range(STEP_TASKS):
                    theta = {k: v.detach().clone().requires_grad_() for k, v in params_.items()}
                    adapted = fo.adapt(theta, buffers, tasks[0][t], tasks[1][t], cell.train.inner_steps, batched=False)
                    adapted = {k: v.detach() for k, v in adapted.items()}
                    theta = {k: v.detach() for k, v in theta.items()}
                    flat = lambda p: torch.cat([p[k].flatten() for k in names])  # noqa: E731
                    rel.append(((flat(adapted) - flat(theta)).norm() / flat(theta).norm()).item())
                    for k in names:
                        per_tensor[k].append(((adapted[k] - theta[k]).norm() / theta[k].norm()).item())
                    with torch.no_grad():
                        for key, p, x, y in (("sb", theta, 0, 1), ("sa", adapted, 0, 1), ("qb", theta, 2, 3),
                                             ("qa", adapted, 2, 3)):
                            losses[key].append(F.cross_entropy(forward(fo.model, p, buffers, tasks[x][t]),
                                                               tasks[y][t]).item())
            mean = lambda v: round(sum(v) / len(v), 3)  # noqa: E731
            out[f"{label} (alpha {alpha:g}, {cell.train.loss_reduction})"] = {
                "batch64 cos(fo, so)": round(F.cosine_similarity(g1, g2, dim=0).item(), 3),
                "||fo||/||so||": round((g1.norm() / g2.norm()).item(), 3),
                "per-task cos (8 tasks) mean": mean(per_task),
                "||theta'-theta||/||theta||": mean(rel),
                "per tensor": {k: mean(v) for k, v in per_tensor.items()},
                "support CE before/after": [mean(losses["sb"]), mean(losses["sa"])],
                "query CE before/after": [mean(losses["qb"]), mean(losses["qa"])],
            }
        return out

    results = [report("init", None)] + [report(run, load_torch(f"{run}/model.pt")["learner"]) for run in runs]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
