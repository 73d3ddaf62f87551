"""Environment steps per second: the meta-batch sampler vs a plain loop over `gymnasium.make` envs.

Both roll out a Gaussian MLP policy (100-100) on HalfCheetah with the same `--frame-skip` (default 1,
rllab's 0.01 s step; gymnasium's own is 5), `tasks x episodes` episodes of `horizon` steps, in this
process. The sampler steps one gymnasium vector env holding every episode of every task, with the
project's task wrapper (rllab's reset and 20-number observation), and calls the policy once per
time step; the plain loop makes one `gymnasium.make` env per task (its own 17-number observation)
and calls the policy once per env step. Medians over `--repeats`.

    python benchmarks/rollouts.py                                   # 40 tasks x 20 episodes x 200 steps
    python benchmarks/rollouts.py --episodes 2 --horizon 50         # a quick look
"""
from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import torch

from mamlbench.algorithms.core import split_state
from mamlbench.rl.envs import sample_tasks
from mamlbench.rl.maml_trpo import make_policy
from mamlbench.rl.sampler import Sampler


def plain_loop(policy, tasks, episodes: int, horizon: int, seed: int, frame_skip: int) -> int:
    """The baseline: for each task, one `gymnasium.make` env, episodes one after another."""
    steps = 0
    gen = torch.Generator().manual_seed(seed)
    for i, _task in enumerate(tasks):
        env = gym.make("HalfCheetah-v5", max_episode_steps=horizon, ctrl_cost_weight=0.05, frame_skip=frame_skip)
        for j in range(episodes):
            obs, _ = env.reset(seed=seed + 1000 * i + j)
            done = False
            while not done:
                with torch.no_grad():
                    mean, log_std = policy(torch.as_tensor(obs, dtype=torch.float32))
                    action = mean + log_std.exp() * torch.randn(mean.shape, generator=gen)
                obs, _, terminated, truncated, _ = env.step(action.clamp(-1, 1).numpy())
                done = terminated or truncated
                steps += 1
        env.close()
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--episodes", type=int, default=20, help="Episodes per task (the paper: 20).")
    ap.add_argument("--horizon", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vector", choices=["sync", "async", "sharded"], default="sync")
    ap.add_argument("--workers", type=int, default=2, help="Processes of the sharded vector env.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frame-skip", type=int, default=1, help="MuJoCo steps per env step (rllab: 1; gymnasium: 5).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    sampler = Sampler("halfcheetah_dir", args.horizon, args.vector, args.workers, {"frame_skip": args.frame_skip})
    policy = make_policy(sampler.obs_dim, sampler.act_dim, [100, 100], 0)
    plain_policy = make_policy(gym.make("HalfCheetah-v5").observation_space.shape[0], sampler.act_dim, [100, 100], 0)
    params, buffers = split_state(policy)
    tasks = sample_tasks("halfcheetah_dir", args.tasks, 0, args.horizon)
    sampler.sample(policy, params, buffers, tasks, args.episodes, seed=0)   # build the vector env once

    rates = {"sampler": [], "plain loop": []}
    for r in range(args.repeats):
        t0 = time.perf_counter()
        steps = sampler.sample(policy, params, buffers, tasks, args.episodes, seed=r).steps
        rates["sampler"].append(steps / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        steps = plain_loop(plain_policy, tasks, args.episodes, args.horizon, seed=r, frame_skip=args.frame_skip)
        rates["plain loop"].append(steps / (time.perf_counter() - t0))
    sampler.close()

    print(f"HalfCheetah (frame skip {args.frame_skip}), {args.tasks} tasks x {args.episodes} episodes x {args.horizon} steps, "
          f"{args.vector} vector env{f' ({args.workers} workers)' if args.vector == 'sharded' else ''}, "
          f"{args.repeats} repeats, torch threads {args.threads}")
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in med.items():
        print(f"  {k:<11} {v:>10.0f} env steps/s (median; runs: {', '.join(f'{x:.0f}' for x in rates[k])})")
    print(f"  ratio       {med['sampler'] / med['plain loop']:>10.2f}x")


if __name__ == "__main__":
    main()
