"""Meta-RL task environments: rewards on hand-built states, task sampling, per-env tasks in vector envs."""
import gymnasium as gym
import numpy as np
import pytest
import torch

from mamlbench.rl.envs import UnknownEnvError, make_env, sample_tasks


pytestmark = pytest.mark.usefixtures("one_thread")


def test_navigation_reward_clipping_and_termination():
    env = make_env("navigation", horizon=100)
    env.reset(seed=0)
    env.reset_task({"goal_x": 0.3, "goal_y": -0.2})
    env.unwrapped._state = np.array([0.25, -0.15])
    obs, reward, terminated, truncated, _ = env.step(np.array([0.5, 0.02]))  # x clipped to 0.1
    np.testing.assert_allclose(obs, [0.35, -0.13], atol=1e-6)
    assert reward == pytest.approx(-np.hypot(0.05, 0.07))
    assert not terminated and not truncated
    env.unwrapped._state = np.array([0.295, -0.2])
    _, reward, terminated, _, _ = env.step(np.array([0.0, 0.005]))           # 0.005 from the goal
    assert terminated and reward == pytest.approx(-np.hypot(0.005, 0.005))


def test_navigation_horizon_truncates():
    env = make_env("navigation", horizon=7)
    env.reset(seed=0)
    env.reset_task({"goal_x": 0.5, "goal_y": 0.5})
    flags = [env.step(np.array([-0.1, -0.1]))[3] for _ in range(7)]
    assert flags == [False] * 6 + [True]


def _cheetah_expected(env, action, task):
    sim = env.unwrapped
    x_before = sim.data.qpos[0]
    obs, reward, *_ = env.step(action)
    v = (sim.data.qpos[0] - x_before) / sim.dt
    a = np.clip(action, -1, 1)
    forward = task["direction"] * v if "direction" in task else -abs(v - task["velocity"])
    return reward, forward - 0.05 * np.sum(a ** 2), v


@pytest.mark.parametrize("name,task", [("halfcheetah_dir", {"direction": -1.0}),
                                       ("halfcheetah_vel", {"velocity": 1.3})])
def test_halfcheetah_reward_on_hand_built_state(name, task):
    env = make_env(name, horizon=200)
    env.reset(seed=0)
    env.reset_task(task)
    sim = env.unwrapped
    qpos = sim.init_qpos.copy()
    qvel = np.zeros(sim.model.nv)
    qvel[0] = 2.0                                   # moving forward at 2 m/s
    sim.set_state(qpos, qvel)
    action = np.array([0.5, -1.5, 0.2, 0.0, 3.0, -0.4])   # two entries outside [-1, 1]
    reward, expected, v = _cheetah_expected(env, action, task)
    assert v > 0.5                                   # the hand-built state really moves
    assert reward == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("name,task", [("ant_dir", {"direction": 1.0}), ("ant_vel", {"velocity": 2.5})])
def test_ant_reward_on_hand_built_state(name, task):
    env = make_env(name, horizon=200)
    env.reset(seed=0)
    env.reset_task(task)
    sim = env.unwrapped
    qvel = np.zeros(sim.model.nv)
    qvel[0] = 1.0
    sim.set_state(sim.init_qpos.copy(), qvel)
    action = np.array([1.5, -0.3, 0.2, 0.9, -2.0, 0.1, 0.0, 0.4])
    x_before = sim.data.body("torso").xpos[0]
    _, reward, terminated, _, _ = env.step(action)
    v = (sim.data.body("torso").xpos[0] - x_before) / sim.dt
    forward = v if "direction" in task else -abs(v - task["velocity"])
    contact = 5e-4 * np.sum(np.clip(sim.data.cfrc_ext, -1, 1) ** 2)
    expected = forward - 0.005 * np.sum(np.clip(action, -1, 1) ** 2) - contact + 0.05
    assert not terminated
    assert reward == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_task_distributions_and_seeding():
    goals = np.array([[t["goal_x"], t["goal_y"]] for t in sample_tasks("navigation", 500, 1)])
    assert goals.min() >= -0.5 and goals.max() <= 0.5 and goals.std() > 0.25
    dirs = [t["direction"] for t in sample_tasks("halfcheetah_dir", 200, 1)]
    assert set(dirs) == {-1.0, 1.0} and 60 < dirs.count(1.0) < 140
    vels = [t["velocity"] for t in sample_tasks("halfcheetah_vel", 200, 1)]
    assert 0 <= min(vels) and max(vels) <= 2 and max(vels) > 1.8
    assert max(t["velocity"] for t in sample_tasks("ant_vel", 200, 1)) > 2.5
    assert sample_tasks("navigation", 5, (0, 3)) == sample_tasks("navigation", 5, (0, 3))
    assert sample_tasks("navigation", 5, (0, 3)) != sample_tasks("navigation", 5, (0, 4))


def test_vector_env_gives_each_sub_env_its_task():
    envs = gym.vector.SyncVectorEnv([lambda: make_env("halfcheetah_dir", 200)] * 3)
    tasks = [{"direction": 1.0}, {"direction": -1.0}, {"direction": 1.0}]
    envs.set_attr("task", tasks)
    assert list(envs.get_attr("task")) == tasks
    envs.close()


def test_unknown_env_is_a_value_error():
    with pytest.raises(UnknownEnvError, match="unknown environment 'pong'"):
        make_env("pong", 10)
    assert issubclass(UnknownEnvError, ValueError)
