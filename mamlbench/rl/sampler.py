"""Seeded rollouts of every task of a meta-batch at once, through gymnasium vector environments.

One vector env holds `tasks x episodes` sub-environments; sub-environment `i * episodes + j` runs
episode j of task i (its task set with `set_attr("task", ...)`). Each time step is one batched
policy call for all of them (one parameter set per task under `vmap` after adaptation) and one
`step` of the vector env, so the Python work per step does not grow with the number of tasks;
only the sub-environments' own `step` calls do (sync), or they run in worker processes: one per
sub-environment (async), or a few, each stepping a contiguous shard of them (sharded: one per core).
The policy and the action noise stay in this process, so every flavour gives the same episodes.

Randomness is a pure function of `seed` (anything `numpy.random.SeedSequence` takes, e.g.
(run seed, iteration, phase)): it seeds every sub-environment's reset and a private
`torch.Generator` for the action noise, so the same seed gives the same episodes, bit for bit.
"""
from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from mamlbench.algorithms.core import Params
from mamlbench.rl.envs import VECTOR_ENVS, Task, make_env
from mamlbench.rl.policy import batched_forward


@dataclass
class Episodes:
    """A batch of padded episodes: (tasks, episodes, horizon, ...) tensors."""
    obs: Tensor          # (T, N, H, obs_dim)
    actions: Tensor      # (T, N, H, act_dim), as sampled (the env clips to [-1, 1] and scales what it applies)
    rewards: Tensor      # (T, N, H)
    mask: Tensor         # (T, N, H), 1 where the step happened
    tasks: list[Task]

    @property
    def returns(self) -> Tensor:
        """Undiscounted return of every episode, (T, N)."""
        return (self.rewards * self.mask).sum(-1)

    @property
    def steps(self) -> int:
        return int(self.mask.sum())


def _shard_worker(pipe, env_fns: list[Callable[[], gym.Env]]) -> None:
    """A worker of `ShardedVectorEnv`: a `SyncVectorEnv` over its shard, driven over a pipe."""
    envs = gym.vector.SyncVectorEnv(env_fns)
    try:
        while True:
            command, arg = pipe.recv()
            if command == "step":
                obs, reward, terminated, truncated, _ = envs.step(arg)
                pipe.send((obs, reward, terminated, truncated))
            elif command == "reset":
                pipe.send(envs.reset(seed=arg)[0])
            elif command == "set_attr":
                envs.set_attr(*arg)
                pipe.send(None)
            else:
                break
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        envs.close()


class ShardedVectorEnv:
    """`num_envs` sub-environments split into `workers` contiguous shards, one process each.

    `AsyncVectorEnv` spends a process per sub-environment, which 800 HalfCheetah episodes cannot
    afford; `SyncVectorEnv` uses one core. This keeps one process per core and one message per
    shard and step. Only what `Sampler` uses: `set_attr`, `reset(seed=[...])`, `step`, `close`;
    `step` returns no infos.
    """

    def __init__(self, env_fns: list[Callable[[], gym.Env]], workers: int):
        self.num_envs = len(env_fns)
        bounds = np.linspace(0, self.num_envs, min(workers, self.num_envs) + 1).astype(int)
        self.slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        ctx = mp.get_context("spawn")   # no forked copy of torch's threads in the workers
        self.pipes, self.procs = [], []
        for s in self.slices:
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_shard_worker, args=(there, env_fns[s]), daemon=True)
            proc.start()
            there.close()
            self.pipes.append(here)
            self.procs.append(proc)

    def _all(self, command: str, args: list) -> list:
        for pipe, arg in zip(self.pipes, args):
            pipe.send((command, arg))
        return [pipe.recv() for pipe in self.pipes]

    def set_attr(self, name: str, values: list) -> None:
        self._all("set_attr", [(name, values[s]) for s in self.slices])

    def reset(self, seed: list[int]):
        return np.concatenate(self._all("reset", [seed[s] for s in self.slices])), {}

    def step(self, actions: np.ndarray):
        parts = self._all("step", [actions[s] for s in self.slices])
        obs, reward, terminated, truncated = (np.concatenate(x) for x in zip(*parts))
        return obs, reward, terminated, truncated, {}

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self.pipes, self.procs = [], []


class Sampler:
    """Collects `n_episodes` episodes per task for a list of tasks with a Gaussian policy.

    Args:
        env_name: a key of `envs.ENVS`.
        horizon: steps per episode at most.
        vector: "sync" steps the sub-environments in this process (best for cheap envs and few
            cores), as arrays where the family has a native vector env (`envs.VECTOR_ENVS`); "async" runs each in its own process (`gymnasium.vector.AsyncVectorEnv`);
            "sharded" splits them over `workers` processes (`ShardedVectorEnv`: MuJoCo on all cores).
        workers: processes of the sharded vector env.
        env_options: keyword arguments of `make_env` (`RLEnvParams.env_options()`); None: its defaults.
    """

    def __init__(self, env_name: str, horizon: int, vector: str = "sync", workers: int = 2,
                 env_options: dict | None = None):
        if vector not in ("sync", "async", "sharded"):
            raise ValueError(f"vector must be sync, async or sharded, got {vector!r}")
        self.env_name, self.horizon, self.vector, self.workers = env_name, horizon, vector, workers
        self.env_options = dict(env_options or {})
        self._envs: Any = None
        probe = make_env(env_name, horizon, **self.env_options)
        self.obs_dim = probe.observation_space.shape[0]
        self.act_dim = probe.action_space.shape[0]
        probe.close()

    def vector_env(self, n: int) -> Any:
        """The vector env of `n` sub-environments, rebuilt only when `n` changes."""
        if self._envs is None or self._envs.num_envs != n:
            self.close()
            fns = [partial(make_env, self.env_name, self.horizon, **self.env_options)] * n
            if self.vector == "sync" and self.env_name in VECTOR_ENVS:
                self._envs = VECTOR_ENVS[self.env_name](n, self.horizon)
            elif self.vector == "sharded":
                self._envs = ShardedVectorEnv(fns, self.workers)
            else:
                cls = gym.vector.SyncVectorEnv if self.vector == "sync" else gym.vector.AsyncVectorEnv
                self._envs = cls(fns)
        return self._envs

    def close(self) -> None:
        if self._envs is not None:
            self._envs.close()
            self._envs = None

    @torch.no_grad()
    def sample(self, policy: nn.Module, params: Params, buffers: Params, tasks: list[Task],
               n_episodes: int, seed: Any, per_task: bool = False) -> Episodes:
        """Episodes of `policy` under `params` (one set per task when `per_task`)."""
        T, N, H = len(tasks), n_episodes, self.horizon
        B = T * N
        envs = self.vector_env(B)
        seq = np.random.SeedSequence(seed)
        env_seeds, torch_seed = seq.generate_state(B), int(seq.generate_state(1, np.uint64)[0] >> 1)
        gen = torch.Generator().manual_seed(torch_seed)
        envs.set_attr("task", [task for task in tasks for _ in range(N)])
        obs_np, _ = envs.reset(seed=[int(s) for s in env_seeds])

        obs = torch.zeros(H, B, self.obs_dim)
        actions = torch.zeros(H, B, self.act_dim)
        rewards = torch.zeros(H, B)
        mask = torch.zeros(H, B)
        alive = np.ones(B, dtype=bool)
        for t in range(H):
            obs[t] = torch.as_tensor(obs_np, dtype=torch.float32)
            mean, log_std = batched_forward(policy, params, buffers, obs[t].view(T, N, -1), per_task)
            action = mean + log_std.exp() * torch.randn(mean.shape, generator=gen)   # (T, N, act_dim)
            actions[t] = action.reshape(B, -1)
            mask[t] = torch.as_tensor(alive, dtype=torch.float32)
            obs_np, reward, terminated, truncated, _ = envs.step(actions[t].numpy())
            rewards[t] = torch.as_tensor(np.where(alive, reward, 0.0), dtype=torch.float32)
            alive &= ~(terminated | truncated)
            if not alive.any():
                break

        def per_task_layout(x: Tensor) -> Tensor:   # (H, B, ...) -> (T, N, H, ...)
            return x.transpose(0, 1).reshape(T, N, H, *x.shape[2:])
        return Episodes(per_task_layout(obs), per_task_layout(actions), per_task_layout(rewards),
                        per_task_layout(mask), list(tasks))
