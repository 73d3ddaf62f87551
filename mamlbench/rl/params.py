"""Parameters of meta-reinforcement learning: the `rl` section of params.yaml.

One `RLEnvParams` section per environment; the class defaults are the 2D-navigation quick budget,
and each environment's section in params.yaml states only what differs (the paper's batch sizes,
horizons). The paper budgets (up to 500 meta-iterations) are dotted overrides under
`profiles.paper`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mamlbench.schema import ConfigError, knob, section

ENV_NAMES = ("navigation", "halfcheetah_dir", "halfcheetah_vel", "ant_dir", "ant_vel")


@dataclass(frozen=True)
class RLEvalParams:
    """Adaptation on fixed test tasks, identical for every policy compared."""
    n_tasks: int = knob(40, "Test tasks (seeded by `seed`, never the training seed).", ge=2)
    seed: int = knob(20170302, "Seed of the test tasks and their episodes.", ge=0)
    inner_lrs: list[float] = knob([0.1, 0.05, 0.05], "Step size of each inner step; their number is the "
                                                     "number of steps (paper: 0.1, then 0.05).", gt=0)
    n_episodes: int = knob(40, "Episodes per task and inner step (paper: 40).", ge=1)
    trace_episodes: int = knob(5, "Episodes drawn per policy in the 2D-navigation trace plot.", ge=1)
    balanced: bool = knob(True, "Direction envs: exactly half the test tasks forward, half backward (n_tasks "
                                "even); false: 50/50 at random, as the reference's 40 draws "
                                "(test_maml_cheetah_direc.py:32-34).")


@dataclass(frozen=True)
class RLEnvParams:
    """MAML-TRPO on one task distribution."""
    horizon: int = knob(100, "Steps per episode (paper: 100 for 2D navigation, 200 for locomotion).", ge=1)
    hidden: list[int] = knob([100, 100], "Hidden ReLU widths of the Gaussian policy's mean (paper: 100, 100).", ge=1)
    inner_lr: float = knob(0.1, "Step size alpha of the REINFORCE inner update (paper: 0.1).", gt=0)
    inner_steps: int = knob(1, "Inner updates during meta-training, each on fresh episodes.", ge=1)
    n_episodes: int = knob(20, "Episodes per task per inner step (paper: 20; 40 for Ant direction).", ge=1)
    meta_batch_size: int = knob(20, "Tasks per meta-update (paper: 20 for 2D navigation, 40 otherwise).", ge=1)
    iterations: int = knob(150, "Meta-iterations (TRPO steps).", ge=1)
    pretrain_iterations: int = knob(150, "TRPO steps of the baseline pretrained on all tasks (no inner update).", ge=1)
    time_budget_minutes: float | None = knob(None, "Stop meta-training after the iteration that passes this much "
                                                   "wall time, and give the pretrained baseline as many iterations; "
                                                   "null: run `iterations`.", gt=0)
    first_order: bool = knob(False, "Drop the inner update's second-order term from the meta-gradient and HVPs.")
    gamma: float = knob(0.99, "Discount of the returns the advantages use.", gt=0, le=1)
    gae_lambda: float = knob(1.0, "GAE lambda; 1 is the paper's return minus baseline.", ge=0, le=1)
    max_kl: float = knob(0.01, "TRPO trust region: mean KL of the post-update policies (paper: 0.01).", gt=0)
    cg_iters: int = knob(10, "Conjugate-gradient iterations.", ge=1)
    cg_damping: float = knob(1e-5, "Added to the Fisher-vector products: keeps CG well posed.", ge=0)
    ls_max_steps: int = knob(15, "Backtracking line search: trials before keeping the old policy.", ge=1)
    ls_backtrack_ratio: float = knob(0.8, "Step shrink factor per trial (rllab: 0.8).", gt=0, lt=1)
    frame_skip: int = knob(1, "MuJoCo steps per env step: rllab's dt is HalfCheetah 1 x 0.01 s, Ant 2 x 0.01 s "
                              "(its xml steps 0.02 s once); gymnasium v5: 5 (0.05 s).", ge=1)
    reset: str = knob("rllab", "MuJoCo initial state: rllab (init_qpos + N(0, 0.01^2), qvel + N(0, 0.1^2)) or "
                               "gymnasium (v5: qpos + U(+-0.1), Ant from qpos0).", choices=["rllab", "gymnasium"])
    observation: str = knob("rllab", "MuJoCo observation: rllab (HalfCheetah 20 numbers with the torso's com; Ant "
                                     "125 with contact forces, torso rotation and com) or gymnasium (v5: 17 / 27).",
                            choices=["rllab", "gymnasium"])
    vector: str = knob("sync", "Vector env: sync (one process), async (a process per episode slot: only for "
                               "small batches of expensive envs) or sharded (`workers` processes, each stepping "
                               "a shard: MuJoCo on every core). The same episodes whichever.",
                       choices=["sync", "async", "sharded"])
    workers: int = knob(2, "Processes of the sharded vector env (one per core).", ge=1)
    checkpoint_every: int = knob(10, "Write a resumable checkpoint every this many meta-iterations.", ge=1)
    log_every: int = knob(1, "Log metrics every this many meta-iterations.", ge=1)
    evaluate: RLEvalParams = section(RLEvalParams)

    def env_options(self) -> dict:
        """The keyword arguments of `envs.make_env` (only the MuJoCo envs use them)."""
        return {"frame_skip": self.frame_skip, "reset": self.reset, "observation": self.observation}


def _env(**overrides) -> dataclasses.Field:
    return dataclasses.field(default_factory=lambda: RLEnvParams(**overrides))


@dataclass(frozen=True)
class RLParams:
    """Meta-RL (issue 5): which environments the pipeline runs, and one section per environment."""
    envs: list[str] = knob(["navigation"], "Environments `dvc repro` trains and evaluates (HalfCheetah and "
                                           "Ant take hours per run; opt in).", choices=list(ENV_NAMES))
    threads: int | None = knob(None, "torch threads; null: torch's default (one per core). The TRPO update's "
                                     "Fisher-vector products are 85% of a 2D-navigation iteration and run 1.6x "
                                     "faster on 2 threads than 1; the env workers idle meanwhile. 1 where runs "
                                     "share the cores.", ge=1)
    navigation: RLEnvParams = section(RLEnvParams)
    halfcheetah_dir: RLEnvParams = _env(horizon=200, meta_batch_size=40, iterations=30, pretrain_iterations=30)
    halfcheetah_vel: RLEnvParams = _env(horizon=200, meta_batch_size=40, iterations=30, pretrain_iterations=30)
    ant_dir: RLEnvParams = _env(horizon=200, meta_batch_size=40, n_episodes=40, iterations=30, pretrain_iterations=30,
                                frame_skip=2)
    ant_vel: RLEnvParams = _env(horizon=200, meta_batch_size=40, iterations=30, pretrain_iterations=30, frame_skip=2)

    def env(self, name: str) -> RLEnvParams:
        if name not in ENV_NAMES:
            raise ConfigError(f"rl env = {name!r}: must be one of {', '.join(ENV_NAMES)}")
        return getattr(self, name)
