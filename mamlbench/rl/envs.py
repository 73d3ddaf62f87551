"""Task distributions for meta-RL as gymnasium environments (Finn et al. 2017, section 5.3).

Every environment here has `sample_tasks(n, rng)` (a list of task dicts) and `reset_task(task)`;
assigning `env.task = task` does the same, which is what `VectorEnv.set_attr("task", tasks)` uses
to give each sub-environment its own task. Tasks are plain dicts of floats, so they serialise.

- `navigation`: a point agent at the origin moves toward a goal uniform in [-0.5, 0.5]^2.
- `halfcheetah_dir` / `halfcheetah_vel` and `ant_dir` / `ant_vel`: gymnasium's MuJoCo
  `HalfCheetah-v5` / `Ant-v5`, wrapped (not copied): the wrapper swaps the forward term of the
  reward for the task's (+-v for a direction, -|v - v_goal| for a velocity) and keeps the
  environment's own cost terms, whose weights are set through `gymnasium.make`.

Actions are clipped to the action space inside the environment, before the reward sees them, so
the control cost is that of the applied action whatever the Gaussian policy samples.

References: Finn, Abbeel & Levine, ICML 2017; the task definitions of cbfinn/maml_rl (rllab).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import gymnasium as gym
import numpy as np

Task = dict[str, float]


class Navigation2DEnv(gym.Env):
    """2D navigation: reward = -||position - goal|| after the move, done within 0.01 of the goal.

    Observation: the position (2,). Action: the displacement, clipped to [-0.1, 0.1]^2.
    """
    metadata = {"render_modes": []}

    def __init__(self, horizon: int = 100, goal_low: float = -0.5, goal_high: float = 0.5):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-0.1, 0.1, (2,), np.float32)
        self.horizon, self.goal_low, self.goal_high = horizon, goal_low, goal_high
        self._task: Task = {"goal_x": 0.0, "goal_y": 0.0}
        self._goal = np.zeros(2)
        self._state = np.zeros(2)
        self._t = 0

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[Task]:
        rng = self.np_random if rng is None else rng
        goals = rng.uniform(self.goal_low, self.goal_high, size=(n, 2))
        return [{"goal_x": float(x), "goal_y": float(y)} for x, y in goals]

    def reset_task(self, task: Task) -> None:
        self._task = dict(task)
        self._goal = np.array([task["goal_x"], task["goal_y"]], dtype=np.float64)

    task = property(lambda self: self._task, reset_task)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._state = np.zeros(2)
        self._t = 0
        return self._state.astype(np.float32), {}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), -0.1, 0.1)
        self._state = self._state + action
        self._t += 1
        dx, dy = self._state - self._goal
        distance = float(np.hypot(dx, dy))
        terminated = bool(abs(dx) < 0.01 and abs(dy) < 0.01)
        truncated = self._t >= self.horizon and not terminated
        return self._state.astype(np.float32), -distance, terminated, truncated, {"task": self._task}


class LocomotionTask(gym.Wrapper):
    """A MuJoCo locomotion env whose forward reward is the task's; the env's own costs are kept.

    reward = forward(v) + sum(info[k] for k in `cost_keys`), v = info["x_velocity"] (the torso's
    finite-difference velocity along x), forward(v) = direction * v or -|v - velocity|.
    """

    def __init__(self, env: gym.Env, mode: str, cost_keys: tuple[str, ...], velocity_high: float):
        if mode not in ("direction", "velocity"):
            raise ValueError(f"mode must be direction or velocity, got {mode!r}")
        super().__init__(env)
        self.mode, self.cost_keys, self.velocity_high = mode, cost_keys, velocity_high
        self._task: Task = {"direction": 1.0} if mode == "direction" else {"velocity": 0.0}

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[Task]:
        rng = self.np_random if rng is None else rng
        if self.mode == "direction":  # forward or backward, 50/50
            return [{"direction": float(d)} for d in rng.choice([-1.0, 1.0], size=n)]
        return [{"velocity": float(v)} for v in rng.uniform(0.0, self.velocity_high, size=n)]

    def reset_task(self, task: Task) -> None:
        self._task = dict(task)

    task = property(lambda self: self._task, reset_task)

    def forward_reward(self, x_velocity: float) -> float:
        if self.mode == "direction":
            return self._task["direction"] * x_velocity
        return -abs(x_velocity - self._task["velocity"])

    def step(self, action):
        action = np.clip(action, self.action_space.low, self.action_space.high)
        obs, _, terminated, truncated, info = self.env.step(action)
        reward = self.forward_reward(info["x_velocity"]) + sum(info[k] for k in self.cost_keys)
        return obs, reward, terminated, truncated, info


def _mujoco_warnings_once() -> None:
    """MuJoCo prints its compiler warnings (gymnasium's half_cheetah.xml uses the deprecated
    `settotalmass`) on every model load: 800 lines for one meta-batch. Python's `warnings` shows
    each message once."""
    import mujoco
    mujoco.set_mju_user_warning(lambda msg: warnings.warn(f"MuJoCo: {msg}", RuntimeWarning, stacklevel=1))


def _halfcheetah(mode: str, horizon: int) -> gym.Env:
    _mujoco_warnings_once()
    # ctrl_cost_weight 0.05: the paper's "minus 0.05 ||a||^2"; no other cost in HalfCheetah.
    env = gym.make("HalfCheetah-v5", max_episode_steps=horizon, disable_env_checker=True,
                   ctrl_cost_weight=0.05)
    return LocomotionTask(env, mode, ("reward_ctrl",), velocity_high=2.0)


def _ant(mode: str, horizon: int) -> gym.Env:
    _mujoco_warnings_once()
    # rllab's ant (used by maml_rl): ctrl 0.5 * 1e-2 ||a||^2, contact 0.5 * 1e-3 ||clip(cfrc, -1, 1)||^2,
    # survive bonus 0.05, episode ends when the torso leaves z in [0.2, 1.0]. The contact forces are
    # left out of the observation (27 numbers instead of 105): they are mostly zero and slow the MLP.
    env = gym.make("Ant-v5", max_episode_steps=horizon, disable_env_checker=True,
                   ctrl_cost_weight=0.005, contact_cost_weight=5e-4, healthy_reward=0.05,
                   include_cfrc_ext_in_observation=False)
    return LocomotionTask(env, mode, ("reward_ctrl", "reward_contact", "reward_survive"), velocity_high=3.0)


ENVS: dict[str, Callable[[int], gym.Env]] = {
    "navigation": lambda horizon: Navigation2DEnv(horizon),
    "halfcheetah_dir": lambda horizon: _halfcheetah("direction", horizon),
    "halfcheetah_vel": lambda horizon: _halfcheetah("velocity", horizon),
    "ant_dir": lambda horizon: _ant("direction", horizon),
    "ant_vel": lambda horizon: _ant("velocity", horizon),
}


class UnknownEnvError(ValueError):
    """An environment name that is not in `ENVS`."""


def make_env(name: str, horizon: int) -> gym.Env:
    """One task environment by name (see `ENVS`), episodes cut at `horizon` steps."""
    if name not in ENVS:
        raise UnknownEnvError(f"unknown environment {name!r} (known: {', '.join(ENVS)})")
    return ENVS[name](horizon)


def sample_tasks(name: str, n: int, seed: Any, horizon: int = 100) -> list[Task]:
    """`n` tasks of environment `name`, a pure function of `seed` (an int or a SeedSequence)."""
    env = make_env(name, horizon)
    try:
        return env.sample_tasks(n, np.random.default_rng(seed))
    finally:
        env.close()
