"""Few-step adaptation on fixed test tasks: return after 0..K inner steps, with 95% CIs (paper fig. 5).

Every policy compared (meta-trained, pretrained on all tasks, random initialisation) sees the same
test tasks and the same episode seeds at each step, and adapts with the same rule: a REINFORCE step
with the linear baseline refit on the episodes just collected, lr 0.1 for the first step and 0.05
after (`RLEvalParams.inner_lrs`). Each step's episodes come from the policy adapted so far.
"""
from __future__ import annotations


import numpy as np
from torch import nn

from mamlbench.algorithms.core import split_state
from mamlbench.progress import Progress
from mamlbench.rl.envs import Navigation2DEnv, sample_tasks
from mamlbench.rl.maml_trpo import adapt, episode_advantages, MetaConfig
from mamlbench.rl.params import RLEnvParams
from mamlbench.rl.policy import stack_params
from mamlbench.rl.sampler import Episodes, Sampler
from mamlbench.stats import mean_ci95


def adaptation_returns(policy: nn.Module, sampler: Sampler, tasks: list, p: RLEnvParams, seed: int
                       ) -> tuple[np.ndarray, list[Episodes]]:
    """(returns (steps + 1, tasks): mean episode return per task after k inner steps, episodes per step)."""
    cfg = MetaConfig(gamma=p.gamma, gae_lambda=p.gae_lambda)
    params, buffers = split_state(policy)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    lrs = p.evaluate.inner_lrs
    adapted, per_task, history, advs = params, False, [], []
    for step in range(len(lrs) + 1):
        eps = sampler.sample(policy, adapted, buffers, tasks, p.evaluate.n_episodes, (seed, step), per_task)
        history.append(eps)
        if step == len(lrs):
            break
        advs.append(episode_advantages(eps, cfg))
        adapted = stack_params([{k: v.detach() for k, v in
                                 adapt(policy, params, buffers, history, advs, i, lrs[:step + 1], True).items()}
                                for i in range(len(tasks))])
        per_task = True
    returns = np.stack([eps.returns.mean(1).numpy() for eps in history])
    return returns, history


def evaluate(env_name: str, policies: dict[str, nn.Module], p: RLEnvParams) -> tuple[dict, dict[str, list[Episodes]]]:
    """Metrics {policy: {step k: {mean, ci95, per_task}}} and the episodes (for trace plots)."""
    tasks = sample_tasks(env_name, p.evaluate.n_tasks, (p.evaluate.seed, 0), p.horizon, p.evaluate.balanced)
    sampler = Sampler(env_name, p.horizon, p.vector, p.workers, p.env_options())
    results, episodes = {}, {}
    bar = Progress(f"evaluate {env_name}", len(policies))  # a line per policy adapted
    try:
        for i, (name, policy) in enumerate(policies.items()):
            returns, eps = adaptation_returns(policy, sampler, tasks, p, p.evaluate.seed)
            bar.update(i + 1, status=f"{name} adapted")
            results[name] = {f"step_{k}": dict(zip(("mean", "ci95"), mean_ci95(r)),
                                               per_task=[float(x) for x in r])
                             for k, r in enumerate(returns)}
            episodes[name] = eps
    finally:
        sampler.close()
        bar.close()
    return {"env": env_name, "tasks": tasks, "policies": results}, episodes


def plot_adaptation(results: dict, path) -> None:
    """Return against inner gradient steps, one line per policy with its 95% CI (paper fig. 5; the
    reference's 1.96 std / sqrt(n) over tasks, as every other table)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mamlbench.io import atomic_path

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for name, steps in results["policies"].items():
        ks = sorted(int(k.split("_")[1]) for k in steps)
        mean = np.array([steps[f"step_{k}"]["mean"] for k in ks])
        ci = np.array([steps[f"step_{k}"]["ci95"] for k in ks])
        ax.plot(ks, mean, marker="o", label=name)
        ax.fill_between(ks, mean - ci, mean + ci, alpha=0.2)
    ax.set_xlabel("number of gradient steps")
    ax.set_ylabel("average return")
    ax.set_xticks(ks)
    ax.set_title(results["env"])
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)   # off the data
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_training(histories: dict[str, list[dict]], path, title: str) -> None:
    """Meta-training curves: each policy's average return per meta-iteration, before and after the
    inner update (the pretrained baseline has no inner update during training: one line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mamlbench.io import atomic_path

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for (name, history), colour in zip(histories.items(), ("tab:blue", "tab:orange", "tab:green")):
        its = [h["iteration"] + 1 for h in history]
        post = [h["returns/post_update"] for h in history]
        pre = [h.get("returns/pre_update", float("nan")) for h in history]
        ax.plot(its, post, color=colour, label=f"{name}, after the inner update" if name == "maml" else name)
        if name == "maml":
            ax.plot(its, pre, color=colour, ls="--", alpha=0.7, label=f"{name}, before")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("average return (training tasks)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_navigation_trace(results: dict, episodes: dict[str, list[Episodes]], path, task: int = 0,
                          n: int = 5, policy: str = "maml") -> None:
    """2D navigation: start, goal and `n` trajectories before and after one inner step on one task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mamlbench.io import atomic_path

    goal = results["tasks"][task]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for step, colour, label in ((0, "tab:blue", "pre-update"), (1, "tab:red", "after 1 step")):
        eps = episodes[policy][step]
        for j in range(min(n, eps.obs.shape[1])):
            length = int(eps.mask[task, j].sum())
            # obs[t] is the position before action t; the last position is obs[t] + its displacement.
            last = eps.obs[task, j, length - 1].numpy() + Navigation2DEnv.move(eps.actions[task, j, length - 1].numpy())
            xy = np.concatenate([eps.obs[task, j, :length].numpy(), last[None]])
            ax.plot(xy[:, 0], xy[:, 1], color=colour, alpha=0.7, lw=1, label=label if j == 0 else None)
    ax.scatter([0], [0], marker="s", color="k", label="start", zorder=3)
    ax.scatter([goal["goal_x"]], [goal["goal_y"]], marker="*", s=200, color="gold", edgecolor="k",
               label="goal", zorder=3)
    ax.set_aspect("equal")
    ax.set(title=f"2D navigation, {policy} policy", xlabel="x position", ylabel="y position")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
