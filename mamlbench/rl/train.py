"""The meta-training loop: tasks, `meta_step`, logging, atomic checkpoints, resume.

Every meta-iteration draws its tasks and episodes from seeds derived from (seed, iteration) alone,
and TRPO keeps no optimiser state, so a run resumed from a checkpoint (policy, iteration, metrics
history) repeats an uninterrupted one exactly on the CPU.

Example:
    policy = train("navigation", params.rl.navigation, seed=0, out_dir="runs/rl/navigation/maml")
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mamlbench.io import load_torch, save_torch, write_json
from mamlbench.rl.envs import sample_tasks
from mamlbench.rl.maml_trpo import MetaConfig, is_finite, make_policy, meta_step
from mamlbench.rl.params import RLEnvParams
from mamlbench.rl.sampler import Sampler

LogFn = Callable[[int, dict[str, float]], None]
TASKS, EPISODES = 0, 1   # seed streams: (seed, iteration, stream)


class DivergedError(ValueError):
    """A meta-iteration produced non-finite metrics."""


def meta_config(p: RLEnvParams, inner_steps: int | None = None) -> MetaConfig:
    names = {f.name for f in dataclasses.fields(MetaConfig)}
    cfg = MetaConfig(**{k: v for k, v in dataclasses.asdict(p).items() if k in names})
    return cfg if inner_steps is None else dataclasses.replace(cfg, inner_steps=inner_steps)


def train(env_name: str, p: RLEnvParams, seed: int, out_dir: str | Path, *, pretrain: bool = False,
          log: LogFn | None = None, progress: Callable[[int, int], None] | None = None,
          iterations: int | None = None, extra: dict | None = None) -> nn.Module:
    """MAML-TRPO (or, with `pretrain`, TRPO on all tasks without an inner update) on `env_name`.

    Writes `out_dir/checkpoint.pt` every `p.checkpoint_every` iterations and at the end, and
    `out_dir/policy.pt` + `out_dir/history.json` when done; resumes from the checkpoint if present.
    `log(iteration, metrics)` is called every `p.log_every` iterations (e.g. MLflow);
    `progress(done, total)` after every iteration; `extra` (e.g. the MLflow run id) is kept in the
    checkpoint, see `checkpoint_extra`.
    """
    out_dir = Path(out_dir)
    total = iterations or (p.pretrain_iterations if pretrain else p.iterations)
    cfg = meta_config(p, 0 if pretrain else None)
    sampler = Sampler(env_name, p.horizon, p.vector)
    policy = make_policy(sampler.obs_dim, sampler.act_dim, p.hidden, seed)
    start, history = 0, []
    ckpt = out_dir / "checkpoint.pt"
    if ckpt.exists():
        state = load_torch(ckpt)
        policy.load_state_dict(state["policy"])
        start, history = state["iteration"], state["history"]
    try:
        for it in range(start, total):
            tasks = sample_tasks(env_name, p.meta_batch_size, (seed, it, TASKS), p.horizon)
            metrics = meta_step(policy, sampler, tasks, cfg, (seed, it, EPISODES))
            if not is_finite(metrics):
                raise DivergedError(f"{env_name} iteration {it}: non-finite metrics {metrics}")
            history.append({"iteration": it, **metrics})
            if log is not None and (it % p.log_every == 0 or it == total - 1):
                log(it, metrics)
            if (it + 1) % p.checkpoint_every == 0 or it == total - 1:
                save_torch(ckpt, {"policy": policy.state_dict(), "iteration": it + 1, "history": history,
                                  "extra": dict(extra or {})})
            if progress is not None:
                progress(it + 1, total)
    finally:
        sampler.close()
    save_torch(out_dir / "policy.pt", {"policy": policy.state_dict(), "hidden": list(p.hidden),
                                      "obs_dim": sampler.obs_dim, "act_dim": sampler.act_dim})
    write_json(out_dir / "history.json", history)
    return policy


def checkpoint_extra(out_dir: str | Path) -> dict:
    """The `extra` dict of the run's checkpoint ({} when there is none yet)."""
    ckpt = Path(out_dir) / "checkpoint.pt"
    return load_torch(ckpt).get("extra", {}) if ckpt.exists() else {}


def load_policy(path: str | Path) -> nn.Module:
    state = load_torch(path)
    policy = make_policy(state["obs_dim"], state["act_dim"], state["hidden"], 0)
    policy.load_state_dict(state["policy"])
    return policy
