"""Task distributions for meta-RL as gymnasium environments (Finn et al. 2017, section 5.3).

Every environment here has `sample_tasks(n, rng)` (a list of task dicts) and `reset_task(task)`;
assigning `env.task = task` does the same, which is what `VectorEnv.set_attr("task", tasks)` uses
to give each sub-environment its own task. Tasks are plain dicts of floats, so they serialise.

- `navigation`: a point agent at the origin moves toward a goal uniform in [-0.5, 0.5]^2.
- `halfcheetah_dir` / `halfcheetah_vel` and `ant_dir` / `ant_vel`: gymnasium's MuJoCo
  `HalfCheetah-v5` / `Ant-v5`, wrapped (not copied): the wrapper swaps the forward term of the
  reward for the task's (+-v for a direction, -|v - v_goal| for a velocity) and keeps the
  environment's own cost terms, whose weights are set through `gymnasium.make`.

The policy acts in [-1, 1]^d everywhere, as under rllab's `normalize()` (normalized_env.py:79-83):
the environment clips the action to [-1, 1] and scales it to its own bounds before the reward sees
it, so the control cost is that of the applied action whatever the Gaussian policy samples.

The locomotion envs default to rllab's dynamics and observations (`frame_skip`, `reset`,
`observation`; docs/protocols.md (meta-RL) has both values of each, row by row); "gymnasium" keeps v5's.

References: Finn, Abbeel & Levine, ICML 2017; the task definitions of cbfinn/maml_rl (rllab).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import gymnasium as gym
import numpy as np

Task = dict[str, float]
MAX_STEP = 0.1   # 2D navigation's action bound (point_env_randgoal.py:17)


class Navigation2DEnv(gym.Env):
    """2D navigation: reward = -||position - goal|| after the move, done within 0.01 of the goal.

    Observation: the position (2,). Action: a in [-1, 1]^2, the displacement 0.1 a (`move`).
    """
    metadata = {"render_modes": []}

    def __init__(self, horizon: int = 100, goal_low: float = -0.5, goal_high: float = 0.5):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
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

    @staticmethod
    def move(action) -> np.ndarray:
        """The displacement of policy output `action`: rllab's normalize() onto point_env_randgoal's
        [-0.1, 0.1] bounds, lb + (a + 1) / 2 (ub - lb) clipped to [lb, ub] (= 0.1 clip(a, -1, 1))."""
        low, high = -MAX_STEP, MAX_STEP
        return np.clip(low + (np.asarray(action, dtype=np.float64) + 1.0) * 0.5 * (high - low), low, high)

    def step(self, action):
        self._state = self._state + self.move(action)
        self._t += 1
        dx, dy = self._state - self._goal
        distance = float(np.hypot(dx, dy))
        terminated = bool(abs(dx) < 0.01 and abs(dy) < 0.01)
        truncated = self._t >= self.horizon and not terminated
        return self._state.astype(np.float32), -distance, terminated, truncated, {"task": self._task}


class NavigationVectorEnv:
    """`num_envs` copies of `Navigation2DEnv` stepped as arrays: what `SyncVectorEnv` over them
    returns, bit for bit (its next-step autoreset included), without a Python call per copy.

    Only what `Sampler` uses: `set_attr("task", tasks)`, `reset(seed=...)`, `step`, `close`. The
    arithmetic is the single env's, elementwise: float64 state, `move`, `hypot`, float32 observations.
    """

    def __init__(self, num_envs: int, horizon: int = 100):
        self.num_envs, self.horizon = num_envs, horizon
        self._goal = np.zeros((num_envs, 2))
        self._state = np.zeros((num_envs, 2))
        self._t = np.zeros(num_envs, dtype=np.int64)
        self._autoreset = np.zeros(num_envs, dtype=bool)

    def set_attr(self, name: str, values: list[Task]) -> None:
        if name != "task" or len(values) != self.num_envs:
            raise ValueError(f"set_attr takes {self.num_envs} tasks as 'task', got {name!r} x {len(values)}")
        self._goal = np.array([[t["goal_x"], t["goal_y"]] for t in values], dtype=np.float64)

    def reset(self, *, seed=None, options=None):
        self._state[:] = 0.0
        self._t[:] = 0
        self._autoreset[:] = False
        return self._state.astype(np.float32), {}

    def step(self, actions: np.ndarray):
        live = ~self._autoreset
        state = np.where(live[:, None], self._state + Navigation2DEnv.move(actions), 0.0)
        t = np.where(live, self._t + 1, 0)
        d = state - self._goal
        terminated = live & (np.abs(d[:, 0]) < 0.01) & (np.abs(d[:, 1]) < 0.01)
        truncated = live & (t >= self.horizon) & ~terminated
        reward = np.where(live, -np.hypot(d[:, 0], d[:, 1]), 0.0)
        self._state, self._t, self._autoreset = state, t, terminated | truncated
        return state.astype(np.float32), reward, terminated, truncated, {}

    def close(self) -> None:
        pass


class LocomotionTask(gym.Wrapper):
    """A MuJoCo locomotion env whose forward reward is the task's; the env's own costs are kept.

    reward = forward(v) + sum(info[k] for k in `cost_keys`), v = info["x_velocity"] (the torso's
    finite-difference velocity along x), forward(v) = direction * v or bonus - |v - velocity|
    (`velocity_bonus`: rllab's ant_env_rand.py:52 adds 1, "make it happy, not suicidal").

    `reset="rllab"` starts from rllab's state distribution (mujoco_env.py:108-115): `init_qpos`
    + N(0, 0.01^2) noise, qvel + N(0, 0.1^2); gymnasium's is U(+-0.1) on qpos. `observation="rllab"`
    returns `rllab_obs(data)` instead of gymnasium's vector.
    """

    def __init__(self, env: gym.Env, mode: str, cost_keys: tuple[str, ...], velocity_high: float,
                 velocity_bonus: float = 0.0, reset: str = "gymnasium", observation: str = "gymnasium",
                 rllab_obs: Callable[[Any], np.ndarray] | None = None, init_qpos: np.ndarray | None = None):
        if mode not in ("direction", "velocity"):
            raise ValueError(f"mode must be direction or velocity, got {mode!r}")
        if reset not in ("rllab", "gymnasium") or observation not in ("rllab", "gymnasium"):
            raise ValueError(f"reset and observation must be rllab or gymnasium, got {reset!r}, {observation!r}")
        super().__init__(env)
        self.mode, self.cost_keys, self.velocity_high = mode, cost_keys, velocity_high
        self.velocity_bonus, self.reset_mode = velocity_bonus, reset
        self.rllab_obs = rllab_obs if observation == "rllab" else None
        sim = env.unwrapped
        self.init_qpos = sim.init_qpos.copy() if init_qpos is None else np.asarray(init_qpos, dtype=np.float64)
        if self.rllab_obs is not None:
            n = self.rllab_obs(sim.data).shape[0]
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (n,), np.float64)
        self._task: Task = {"direction": 1.0} if mode == "direction" else {"velocity": 0.0}

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None, balanced: bool = False) -> list[Task]:
        """`n` tasks; direction tasks are forward or backward 50/50 at random, or with `balanced`
        exactly n/2 of each in a random order."""
        rng = self.np_random if rng is None else rng
        if self.mode == "direction":
            if not balanced:
                return [{"direction": float(d)} for d in rng.choice([-1.0, 1.0], size=n)]
            if n % 2:
                raise ValueError(f"balanced direction tasks: {n} is odd, so forward and backward cannot be "
                                 f"equal (use an even number of tasks)")
            return [{"direction": float(d)} for d in rng.permutation([1.0, -1.0] * (n // 2))]
        return [{"velocity": float(v)} for v in rng.uniform(0.0, self.velocity_high, size=n)]

    def reset_task(self, task: Task) -> None:
        self._task = dict(task)

    task = property(lambda self: self._task, reset_task)

    def forward_reward(self, x_velocity: float) -> float:
        if self.mode == "direction":
            return self._task["direction"] * x_velocity
        return self.velocity_bonus - abs(x_velocity - self._task["velocity"])

    def _observe(self, obs: np.ndarray) -> np.ndarray:
        return obs if self.rllab_obs is None else self.rllab_obs(self.env.unwrapped.data)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        if self.reset_mode == "rllab":
            import mujoco
            sim = self.env.unwrapped
            rng = sim.np_random   # seeded by the reset above
            sim.set_state(self.init_qpos + 0.01 * rng.standard_normal(sim.model.nq),
                          sim.init_qvel + 0.1 * rng.standard_normal(sim.model.nv))
            mujoco.mj_rnePostConstraint(sim.model, sim.data)   # cfrc_ext of the new state
            obs = sim._get_obs()
        return self._observe(obs), info

    def step(self, action):
        action = np.clip(action, self.action_space.low, self.action_space.high)
        obs, _, terminated, truncated, info = self.env.step(action)
        reward = self.forward_reward(info["x_velocity"]) + sum(info[k] for k in self.cost_keys)
        return self._observe(obs), reward, terminated, truncated, info


def _mujoco_warnings_once() -> None:
    """MuJoCo prints its compiler warnings (gymnasium's half_cheetah.xml uses the deprecated
    `settotalmass`) on every model load: 800 lines for one meta-batch. Python's `warnings` shows
    each message once."""
    import mujoco
    mujoco.set_mju_user_warning(lambda msg: warnings.warn(f"MuJoCo: {msg}", RuntimeWarning, stacklevel=1))


def _torso_com(data) -> np.ndarray:
    """rllab's get_body_com("torso") (mujoco_env.py:222-224): the torso subtree's centre of mass."""
    return data.subtree_com[data.body("torso").id]


def cheetah_rllab_obs(data) -> np.ndarray:
    """HalfCheetah as half_cheetah_env_rand.py:41-47 observes it: qpos[1:], qvel, torso com (20)."""
    return np.concatenate([data.qpos[1:], data.qvel, _torso_com(data)])


def ant_rllab_obs(data) -> np.ndarray:
    """Ant as ant_env_rand.py:21-28 observes it: qpos, qvel, clip(cfrc_ext, -1, 1) of every body
    (the world's included), the torso's rotation matrix and com (125)."""
    return np.concatenate([data.qpos, data.qvel, np.clip(data.cfrc_ext, -1, 1).ravel(),
                           data.body("torso").xmat, _torso_com(data)])


# rllab's ant.xml `init_qpos` (vendor/mujoco_models/ant.xml:5): gymnasium's copy of the file keeps the
# numeric but starts from qpos0 (torso at 0.75, legs straight) instead.
ANT_RLLAB_INIT_QPOS = (0.0, 0.0, 0.55, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0, -1.0, 0.0, 1.0)


def _halfcheetah(mode: str, horizon: int, frame_skip: int = 1, reset: str = "rllab",
                 observation: str = "rllab") -> gym.Env:
    _mujoco_warnings_once()
    # ctrl_cost_weight 0.05: rllab's 1e-1 * 0.5 ||a||^2 (half_cheetah_env_rand.py:61); no other cost.
    env = gym.make("HalfCheetah-v5", max_episode_steps=horizon, disable_env_checker=True,
                   ctrl_cost_weight=0.05, frame_skip=frame_skip)
    return LocomotionTask(env, mode, ("reward_ctrl",), velocity_high=2.0, reset=reset, observation=observation,
                          rllab_obs=cheetah_rllab_obs)


def _ant(mode: str, horizon: int, frame_skip: int = 2, reset: str = "rllab", observation: str = "rllab") -> gym.Env:
    _mujoco_warnings_once()
    # rllab's ant (ant_env_rand.py:49-62): ctrl 0.5 * 1e-2 ||a||^2, contact 0.5 * 1e-3 ||clip(cfrc, -1, 1)||^2,
    # survive bonus 0.05, episode ends when the torso leaves z in [0.2, 1.0]; the velocity task adds 1.
    # With observation "gymnasium" the contact forces are left out (27 numbers instead of 105).
    env = gym.make("Ant-v5", max_episode_steps=horizon, disable_env_checker=True,
                   ctrl_cost_weight=0.005, contact_cost_weight=5e-4, healthy_reward=0.05, frame_skip=frame_skip,
                   include_cfrc_ext_in_observation=False)
    return LocomotionTask(env, mode, ("reward_ctrl", "reward_contact", "reward_survive"), velocity_high=3.0,
                          velocity_bonus=1.0 if mode == "velocity" else 0.0, reset=reset, observation=observation,
                          rllab_obs=ant_rllab_obs, init_qpos=np.array(ANT_RLLAB_INIT_QPOS) if reset == "rllab" else None)


# Families with a native vector env: `Sampler(vector="sync")` uses it (the same episodes, bit for bit).
VECTOR_ENVS: dict[str, Callable[[int, int], Any]] = {"navigation": NavigationVectorEnv}

ENVS: dict[str, Callable[..., gym.Env]] = {
    "navigation": lambda horizon, **_: Navigation2DEnv(horizon),
    "halfcheetah_dir": lambda horizon, **o: _halfcheetah("direction", horizon, **o),
    "halfcheetah_vel": lambda horizon, **o: _halfcheetah("velocity", horizon, **o),
    "ant_dir": lambda horizon, **o: _ant("direction", horizon, **o),
    "ant_vel": lambda horizon, **o: _ant("velocity", horizon, **o),
}


class UnknownEnvError(ValueError):
    """An environment name that is not in `ENVS`."""


def make_env(name: str, horizon: int, **options) -> gym.Env:
    """One task environment by name (see `ENVS`), episodes cut at `horizon` steps; `options`
    (frame_skip, reset, observation: `RLEnvParams.env_options()`) apply to the MuJoCo envs."""
    if name not in ENVS:
        raise UnknownEnvError(f"unknown environment {name!r} (known: {', '.join(ENVS)})")
    return ENVS[name](horizon, **options)


def sample_tasks(name: str, n: int, seed: Any, horizon: int = 100, balanced: bool = False) -> list[Task]:
    """`n` tasks of environment `name`, a pure function of `seed` (an int or a SeedSequence);
    `balanced`: as many forward as backward direction tasks (other task families ignore it)."""
    env = make_env(name, horizon)
    try:
        if isinstance(env, LocomotionTask):
            return env.sample_tasks(n, np.random.default_rng(seed), balanced=balanced)
        return env.sample_tasks(n, np.random.default_rng(seed))
    finally:
        env.close()
