"""Sinusoid regression (Finn et al. 2017, section 5.1): meta-train MAML, train the paper's
"pretrained on all tasks" baseline, evaluate both on one fixed test set, draw figure 2.

Evaluation fine-tunes both models the same way (SGD, `evaluate.inner_lr`) on K support points of
each of the fixed test tasks and reports the query MSE after 0, 1, 5 and 10 steps.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mamlbench import distributed, rng
from mamlbench.algorithms.maml import MAML
from mamlbench.config import Params
from mamlbench.data.sinusoid import fixed_test_tasks, sample_points, sample_tasks, task_batch
from mamlbench.io import load_torch, save_torch, write_json, write_text
from mamlbench.models.mlp import MLP
from mamlbench.provenance import identity, record
from mamlbench.stats import mean_ci95
from mamlbench.schema import to_dict
from mamlbench.train import (Checkpointer, LoopConfig, LoopResult, meta_update, resolve_device, run_loop,
                             train_provenance, trajectory_settings, write_clock, write_curve)

MODELS = ("maml", "pretrain")


def build_model(params: Params) -> MLP:
    """The paper's 1-40-40-1 ReLU regressor, initialised from the run's seed."""
    torch.manual_seed(rng.derive_seed(params.seed, "sinusoid-init"))
    return MLP(1, params.sinusoid.hidden, 1, init=params.sinusoid.init)


def trajectory(params: Params, kind: str) -> dict:
    """What fixes a training trajectory (budgets and logging periods excluded: a run may be extended)."""
    section = trajectory_settings(to_dict(params.sinusoid.train if kind == "maml" else params.sinusoid.pretrain),
                                  ("iterations", "time_budget_minutes", "checkpoint_every", "log_every"))
    return {"kind": kind, "seed": params.seed, "hidden": params.sinusoid.hidden, "init": params.sinusoid.init,
            **section}


def checkpointer(params: Params, kind: str, run_dir: str | Path) -> Checkpointer:
    return Checkpointer(Path(run_dir) / "checkpoints", identity(__name__, trajectory(params, kind)))


def train(params: Params, kind: str, run_dir: str | Path, *, resume_state: dict | None = None,
          log=None, extra: dict | None = None, progress: bool = True) -> LoopResult:
    """Meta-train MAML (`kind='maml'`) or the pretrained baseline; write `model.pt` and the curve."""
    if kind not in MODELS:
        raise ValueError(f"unknown sinusoid model {kind!r} (have: {', '.join(MODELS)})")
    run_dir = Path(run_dir)
    cfg = params.sinusoid.train if kind == "maml" else params.sinusoid.pretrain
    device = resolve_device(cfg.device)
    batch_key = "sinusoid.train.meta_batch_size" if kind == "maml" else "sinusoid.pretrain.batch_tasks"
    model = build_model(params).to(device)

    if kind == "maml":
        learner = MAML(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps,
                       first_order=cfg.algorithm == "fomaml", strategy=cfg.strategy, loss_fn=F.mse_loss,
                       precision=cfg.precision)
        optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.meta_lr)

        def step(iteration: int) -> dict[str, float]:
            generator = rng.generator(params.seed, "sinusoid-train", iteration)
            batch = task_batch(cfg.meta_batch_size, cfg.k_shot, cfg.k_query, generator)  # 4 x (tasks, K, 1)
            batch = [t.to(device) for t in distributed.shard(batch, cfg.meta_batch_size, batch_key)]  # rank's tasks
            out = meta_update(learner, optimizer, batch, cfg.grad_clip, after_backward=distributed.all_reduce_grads)
            return distributed.mean_metrics({"meta_train/query_loss": out.loss.item()})

        setting = f"inner_lr={cfg.inner_lr}, meta_lr={cfg.meta_lr}, inner_steps={cfg.inner_steps}"
    else:
        learner = model
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)

        def step(iteration: int) -> dict[str, float]:
            generator = rng.generator(params.seed, "sinusoid-pretrain", iteration)
            points = sample_points(sample_tasks(cfg.batch_tasks, generator), cfg.k, generator)  # x, y: (tasks, k, 1)
            x, y = (t.to(device) for t in distributed.shard(points, cfg.batch_tasks, batch_key))
            loss = F.mse_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.all_reduce_grads(model)
            optimizer.step()
            return distributed.mean_metrics({"pretrain/loss": loss.item()})

        setting = f"lr={cfg.lr}"

    loop = LoopConfig(cfg.iterations, cfg.checkpoint_every, cfg.log_every, describe=f"sinusoid {kind}", setting=setting,
                      time_budget_minutes=getattr(cfg, "time_budget_minutes", None))  # the baseline has none
    checkpoints = checkpointer(params, kind, run_dir)
    result = run_loop(learner, optimizer, step, loop, checkpoints, resume_state=resume_state, log=log, extra=extra,
                      progress=progress)
    if not distributed.is_main():  # rank 0 writes the outputs
        return result
    save_torch(run_dir / "model.pt", {"state_dict": model.state_dict(), "hidden": params.sinusoid.hidden,
                                      "kind": kind, "iterations": result.iterations})
    write_curve(run_dir / "curve.csv", result.history)
    write_clock(run_dir / "clock.csv", result.clock)
    write_json(run_dir / "train.json", {"iterations": result.iterations, **result.last(),
                                        "provenance": train_provenance(result, checkpoints, params, device)})
    return result


def load_model(path: str | Path) -> MLP:
    state = load_torch(path)
    model = MLP(1, list(state["hidden"]), 1)
    model.load_state_dict(state["state_dict"])
    return model


def evaluate(params: Params, model_paths: dict[str, str | Path], out_dir: str | Path) -> dict:
    """Query MSE of each model on the fixed test tasks; writes metrics.json, per_task.csv, fits.png."""
    cfg = params.sinusoid.evaluate
    out_dir = Path(out_dir)
    max_k, max_steps = max(cfg.k_shots), max(cfg.inner_steps)
    n_query = cfg.n_query or max_k  # null: K queries for K shots, the first K of max_k stored ones
    tasks, support_x, support_y, query_x, query_y = fixed_test_tasks(cfg.n_tasks, max_k, n_query, cfg.seed)
    metrics: dict = {}
    rows = ["model,k_shot,inner_steps,task,mse"]
    models = {name: load_model(path) for name, path in model_paths.items()}
    for name, model in models.items():
        learner = MAML(model, inner_lr=cfg.inner_lr, loss_fn=F.mse_loss)
        for k in cfg.k_shots:
            q = cfg.n_query or k
            mse = learner.trajectory(support_x[:, :k], support_y[:, :k], query_x[:, :q], query_y[:, :q],
                                     max_steps)  # (tasks, steps+1)
            for s in cfg.inner_steps:
                mean, ci = mean_ci95(mse[:, s].numpy())
                metrics.setdefault(name, {}).setdefault(f"k{k}", {})[f"step{s}"] = {"mse": mean, "ci95": ci}
                rows += [f"{name},{k},{s},{t},{v:.6g}" for t, v in enumerate(mse[:, s].tolist())]
    protocol = identity(__name__, {"evaluate": to_dict(cfg)})
    write_json(out_dir / "metrics.json", {**metrics, "provenance": record(protocol, params.profile, "cpu")})
    write_text(out_dir / "per_task.csv", "\n".join(rows) + "\n")
    plot_fits(models, tasks, support_x, support_y, cfg.inner_lr, out_dir / "fits.png")
    return metrics


def plot_fits(models: dict, tasks, support_x, support_y, inner_lr: float, path: Path,
              task: int | None = None, k_shots: tuple[int, ...] = (5, 10), steps: tuple[int, ...] = (0, 1, 10)) -> None:
    """The paper's figure 2: true curve, K points, predictions before and after 1 and 10 steps.

    By default the first test task of amplitude >= 2, so the curve is not flat at plotting scale.
    """
    if task is None:
        task = int((tasks.amplitude >= 2).nonzero()[0, 0]) if bool((tasks.amplitude >= 2).any()) else 0
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(-5, 5, 200)[None, :, None]  # (1, 200, 1)
    one = type(tasks)(tasks.amplitude[task:task + 1], tasks.phase[task:task + 1])
    fig, axes = plt.subplots(len(k_shots), len(models), figsize=(5 * len(models), 3.6 * len(k_shots)),
                             squeeze=False, sharey=True)
    styles = {0: ("pre-update", ":"), 1: ("1 grad step", "--"), 10: ("10 grad steps", "-.")}
    for row, k in enumerate(k_shots):
        for col, (name, model) in enumerate(models.items()):
            learner = MAML(model, inner_lr=inner_lr, loss_fn=F.mse_loss)
            preds = learner.trajectory(support_x[task:task + 1, :k], support_y[task:task + 1, :k], grid,
                                       one(grid), max(steps), metric=lambda out, y: out)[0]  # (steps+1, 200, 1)
            ax = axes[row][col]
            ax.plot(grid[0, :, 0], one(grid)[0, :, 0], color="red", lw=2, label="ground truth")
            for s in steps:
                label, style = styles.get(s, (f"{s} steps", "-"))
                ax.plot(grid[0, :, 0], preds[s, :, 0], style, lw=1.6, label=label)
            ax.scatter(support_x[task, :k, 0], support_y[task, :k, 0], marker="^", color="purple", zorder=5,
                       label="used for grad")
            ax.set_title(f"{'MAML' if name == 'maml' else 'pretrained'}, K={k}")
            ax.set(xlim=(-5, 5), xlabel="x", ylabel="y" if col == 0 else None)
            if row == 0 and col == 0:
                ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Sinusoid: A={one.amplitude[0]:.2f}, phase={one.phase[0]:.2f}")
    fig.tight_layout()
    from mamlbench.io import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
