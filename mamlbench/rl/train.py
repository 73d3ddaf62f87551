"""The meta-training loop: tasks, `meta_step`, logging, atomic checkpoints, resume.

Every meta-iteration draws its tasks and episodes from seeds derived from (seed, iteration) alone,
and TRPO keeps no optimiser state, so a run resumed from a checkpoint (policy, iteration, metrics
history) repeats an uninterrupted one exactly on the CPU. Checkpoints go through the few-shot
loop's `Checkpointer`: checksummed, the newest two kept, and stamped with the run's identity (code
and settings), so a run with other settings (`dvc exp run -S rl.navigation.inner_lr=...`) or after
a change to the training code starts afresh instead of resuming a policy trained under the old ones.

Example:
    policy = train("navigation", params.rl.navigation, seed=0, out_dir="runs/rl/navigation/maml")
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from torch import nn

from mamlbench.io import load_torch, save_torch, write_json
from mamlbench.rl.envs import sample_tasks
from mamlbench.rl.maml_trpo import MetaConfig, is_finite, make_policy, meta_step
from mamlbench.rl.params import RLEnvParams
from mamlbench.provenance import identity, record
from mamlbench.rl.sampler import Sampler
from mamlbench.train import Checkpointer, trajectory_settings

LogFn = Callable[[int, dict[str, float]], None]
TASKS, EPISODES = 0, 1   # seed streams: (seed, iteration, stream)


class DivergedError(ValueError):
    """A meta-iteration produced non-finite metrics."""


def meta_config(p: RLEnvParams, inner_steps: int | None = None) -> MetaConfig:
    names = {f.name for f in dataclasses.fields(MetaConfig)}
    cfg = MetaConfig(**{k: v for k, v in dataclasses.asdict(p).items() if k in names})
    return cfg if inner_steps is None else dataclasses.replace(cfg, inner_steps=inner_steps)


# What does not change a run's trajectory: budgets, logging, evaluation, the vector-env flavour.
_NOT_IN_FINGERPRINT = ("iterations", "pretrain_iterations", "time_budget_minutes", "checkpoint_every", "log_every",
                       "evaluate", "vector", "workers")


def checkpointer(env_name: str, p: RLEnvParams, seed: int, out_dir: str | Path, pretrain: bool) -> Checkpointer:
    settings = trajectory_settings(dataclasses.asdict(p), _NOT_IN_FINGERPRINT)
    return Checkpointer(Path(out_dir) / "checkpoints",
                        identity(__name__, {"env": env_name, "seed": seed, "pretrain": pretrain, "settings": settings}))


def train(env_name: str, p: RLEnvParams, seed: int, out_dir: str | Path, *, pretrain: bool = False,
          log: LogFn | None = None, progress: Callable[[int, int], None] | None = None,
          iterations: int | None = None, extra: dict | None = None, time_budget_s: float | None = None) -> nn.Module:
    """MAML-TRPO (or, with `pretrain`, TRPO on all tasks without an inner update) on `env_name`.

    Writes `out_dir/checkpoints/` every `p.checkpoint_every` iterations and at the end, and
    `out_dir/policy.pt` + `out_dir/history.json` when done; resumes from the checkpoint if present.
    `log(iteration, metrics)` is called every `p.log_every` iterations (e.g. MLflow);
    `progress(done, total)` after every iteration; `extra` (e.g. the MLflow run id) is kept in the
    checkpoint, see `checkpoint_extra`. With `time_budget_s`, training stops after the iteration
    that passes that much wall time (counted across resumes); the checkpoint marks the run finished,
    so rerunning does not train further.
    """
    out_dir = Path(out_dir)
    total = iterations or (p.pretrain_iterations if pretrain else p.iterations)
    cfg = meta_config(p, 0 if pretrain else None)
    sampler = Sampler(env_name, p.horizon, p.vector, p.workers, p.env_options())
    policy = make_policy(sampler.obs_dim, sampler.act_dim, p.hidden, seed)
    start, history, seconds = 0, [], 0.0
    ckpts = checkpointer(env_name, p, seed, out_dir, pretrain)
    state = ckpts.latest()
    ckpts.discard_foreign()
    if state is not None:
        policy.load_state_dict(state["policy"])
        start, history, seconds = state["iteration"], state["history"], state.get("seconds", 0.0)
        if state.get("out_of_time") and time_budget_s is not None and seconds >= time_budget_s:
            total = start
    began = time.perf_counter() - seconds
    try:
        for it in range(start, total):
            tasks = sample_tasks(env_name, p.meta_batch_size, (seed, it, TASKS), p.horizon)
            metrics = meta_step(policy, sampler, tasks, cfg, (seed, it, EPISODES))
            if not is_finite(metrics):
                raise DivergedError(f"{env_name} iteration {it}: non-finite metrics {metrics}")
            history.append({"iteration": it, **metrics})
            if log is not None and (it % p.log_every == 0 or it == total - 1):
                log(it, metrics)
            seconds = time.perf_counter() - began
            out_of_time = time_budget_s is not None and seconds >= time_budget_s
            if (it + 1) % p.checkpoint_every == 0 or it == total - 1 or out_of_time:
                ckpts.save({"policy": policy.state_dict(), "iteration": it + 1, "history": history,
                            "seconds": seconds, "out_of_time": out_of_time, "extra": dict(extra or {})})
            if progress is not None:
                progress(it + 1, total)
            if out_of_time:
                break
    finally:
        sampler.close()
    save_torch(out_dir / "policy.pt", {"policy": policy.state_dict(), "hidden": list(p.hidden),
                                      "obs_dim": sampler.obs_dim, "act_dim": sampler.act_dim})
    write_json(out_dir / "history.json", history)
    return policy


def checkpoint_extra(env_name: str, p: RLEnvParams, seed: int, out_dir: str | Path, pretrain: bool) -> dict:
    """The `extra` dict of the run's newest checkpoint of these settings ({} when there is none yet)."""
    state = checkpointer(env_name, p, seed, out_dir, pretrain).latest()
    return state.get("extra", {}) if state else {}


def provenance(env_name: str, p: RLEnvParams, seed: int, out_dir: str | Path, pretrain: bool, profile: str) -> dict:
    """The provenance of the run's newest checkpoint (`mamlbench.provenance.record`): train.json and MLflow."""
    ckpts = checkpointer(env_name, p, seed, out_dir, pretrain)
    state = ckpts.latest() or {}
    return record(ckpts.identity, profile, "cpu", seconds=state.get("seconds"), iterations=state.get("iteration"),
                  stopped="time_budget" if state.get("out_of_time") else "iterations")


def load_policy(path: str | Path) -> nn.Module:
    state = load_torch(path)
    policy = make_policy(state["obs_dim"], state["act_dim"], state["hidden"], 0)
    policy.load_state_dict(state["policy"])
    return policy
