"""Meta-RL task environments: rewards on hand-built states, task sampling, per-env tasks in vector envs."""
import gymnasium as gym
import numpy as np
import pytest
import torch

from mamlbench.rl.envs import NavigationVectorEnv, UnknownEnvError, make_env, sample_tasks


pytestmark = pytest.mark.usefixtures("one_thread")


def test_navigation_maps_actions_as_rllab_normalize_and_rewards_distance():
    """rllab: normalize(PointEnvRandGoal()) (maml_trpo_point.py:32): the policy acts in [-1, 1], the
    env moves lb + (a + 1) / 2 (ub - lb) clipped to [lb, ub] = [-0.1, 0.1], i.e. 0.1 clip(a, -1, 1)."""
    env = make_env("navigation", horizon=100)
    env.reset(seed=0)
    env.reset_task({"goal_x": 0.3, "goal_y": -0.2})
    assert env.action_space.low.tolist() == [-1, -1] and env.action_space.high.tolist() == [1, 1]
    env.unwrapped._state = np.array([0.25, -0.15])
    # a = (0.5, 0.2): by hand, -0.1 + 1.5 * 0.5 * 0.2 = 0.05 and -0.1 + 1.2 * 0.1 = 0.02 (not clipped).
    obs, reward, terminated, truncated, _ = env.step(np.array([0.5, 0.2]))
    np.testing.assert_allclose(obs, [0.30, -0.13], atol=1e-6)
    assert reward == pytest.approx(-np.hypot(0.0, 0.07))
    assert not terminated and not truncated
    # a = (3.0, -0.4): x saturates at 0.1, y moves -0.04.
    obs, reward, *_ = env.step(np.array([3.0, -0.4]))
    np.testing.assert_allclose(obs, [0.40, -0.17], atol=1e-6)
    assert reward == pytest.approx(-np.hypot(0.1, 0.03))
    env.unwrapped._state = np.array([0.295, -0.2])
    _, reward, terminated, _, _ = env.step(np.array([0.0, 0.05]))            # moves (0, 0.005)
    assert terminated and reward == pytest.approx(-np.hypot(0.005, 0.005))


def test_navigation_initial_policy_rarely_saturates():
    """With std 1 on [-1, 1], a zero-mean action saturates with P(|z| > 1) = 0.317 per coordinate;
    clipping the raw output to +-0.1 saturated 92% (P(|z| > 0.1))."""
    a = np.random.default_rng(0).standard_normal((20000, 2))
    saturated = np.mean(np.isclose(np.abs(make_env("navigation", 10).unwrapped.move(a)), 0.1))
    assert 0.30 < saturated < 0.335, saturated


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
    # ant_env_rand.py:52: the velocity task's forward reward is -|v - goal| + 1; the direction one has no +1.
    forward = v if "direction" in task else -abs(v - task["velocity"]) + 1.0
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
    assert sample_tasks("halfcheetah_vel", 6, 1, balanced=True) == sample_tasks("halfcheetah_vel", 6, 1)
    assert sample_tasks("navigation", 5, (0, 3)) == sample_tasks("navigation", 5, (0, 3))
    assert sample_tasks("navigation", 5, (0, 3)) != sample_tasks("navigation", 5, (0, 4))


def test_vector_env_gives_each_sub_env_its_task():
    envs = gym.vector.SyncVectorEnv([lambda: make_env("halfcheetah_dir", 200)] * 3)
    tasks = [{"direction": 1.0}, {"direction": -1.0}, {"direction": 1.0}]
    envs.set_attr("task", tasks)
    assert list(envs.get_attr("task")) == tasks
    envs.close()


def test_navigation_vector_env_is_sync_vector_env_bit_for_bit():
    """The array env against gymnasium's SyncVectorEnv over single envs: goals one move away
    terminate at step 1 (then autoreset at step 2: reward 0, obs 0), a horizon of 3 truncates the
    others, and random actions (clipped or not) give identical float64 rewards and float32 states."""
    horizon, rng = 3, np.random.default_rng(0)
    tasks = [{"goal_x": 0.05, "goal_y": 0.0}, {"goal_x": -0.3, "goal_y": 0.2}, {"goal_x": 0.0, "goal_y": -0.1}]
    reference = gym.vector.SyncVectorEnv([lambda: make_env("navigation", horizon)] * 3)
    arrays = NavigationVectorEnv(3, horizon)
    actions = [np.array([[0.5, 0.0], [0.3, -2.0], [0.0, -1.0]], dtype=np.float32)]   # envs 0 and 2 reach their goals
    actions += [rng.uniform(-1.5, 1.5, (3, 2)).astype(np.float32) for _ in range(5)]
    outs = []
    for envs in (reference, arrays):
        envs.set_attr("task", tasks)
        first, _ = envs.reset(seed=[1, 2, 3])
        steps = [first]
        for a in actions:
            steps.append(envs.step(a)[:4])
        outs.append(steps)
    ref, arr = outs
    np.testing.assert_array_equal(ref[0], arr[0])
    for r, a in zip(ref[1:], arr[1:]):
        for x, y in zip(r, a):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
    assert ref[1][2].tolist() == [True, False, True]                     # terminated at the goal
    assert ref[2][1][[0, 2]].tolist() == [0.0, 0.0]                      # autoreset step
    assert ref[3][3][1] and not ref[3][2][1]                             # env 1 truncated at the horizon


def test_sampler_native_navigation_env_gives_the_gymnasium_episodes():
    from mamlbench.rl.maml_trpo import make_policy
    from mamlbench.algorithms.core import split_state
    from mamlbench.rl.sampler import Sampler
    policy = make_policy(2, 2, [8], seed=0)
    params, buffers = split_state(policy)
    tasks = sample_tasks("navigation", 4, seed=0)
    native = Sampler("navigation", 20, "sync")
    gymnasium_envs = Sampler("navigation", 20, "sync")
    gymnasium_envs._envs = gym.vector.SyncVectorEnv([lambda: make_env("navigation", 20)] * 12)
    a, b = (s.sample(policy, params, buffers, tasks, 3, (0, 1)) for s in (native, gymnasium_envs))
    assert isinstance(native._envs, NavigationVectorEnv)
    for name in ("obs", "actions", "rewards", "mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_unknown_env_is_a_value_error():
    with pytest.raises(UnknownEnvError, match="unknown environment 'pong'"):
        make_env("pong", 10)
    assert issubclass(UnknownEnvError, ValueError)


@pytest.mark.parametrize("name", ["halfcheetah_dir", "ant_dir"])
def test_balanced_direction_tasks(name):
    for seed in range(5):
        dirs = [t["direction"] for t in sample_tasks(name, 40, seed, balanced=True)]
        assert dirs.count(1.0) == 20 and dirs.count(-1.0) == 20
    assert sample_tasks(name, 40, 0, balanced=True) != sample_tasks(name, 40, 1, balanced=True)   # shuffled
    with pytest.raises(ValueError, match="odd"):
        sample_tasks(name, 7, 0, balanced=True)


def test_evaluation_uses_balanced_direction_tasks():
    """The test tasks of `evaluate` (paper fig. 5): 20 forward and 20 backward; 40 random draws of
    the evaluation seed give 18 / 22."""
    from mamlbench.rl.evaluate import evaluate
    from mamlbench.rl.maml_trpo import make_policy
    from mamlbench.rl.params import RLEnvParams, RLEvalParams
    p = RLEnvParams(horizon=2, hidden=[4], evaluate=RLEvalParams(n_episodes=1, inner_lrs=[0.1]))
    unbalanced = [t["direction"] for t in sample_tasks("halfcheetah_dir", 40, (p.evaluate.seed, 0))]
    assert unbalanced.count(1.0) != 20
    probe = make_env("halfcheetah_dir", 2)
    policy = make_policy(probe.observation_space.shape[0], probe.action_space.shape[0], [4], 0)
    results, _ = evaluate("halfcheetah_dir", {"random": policy}, p)
    dirs = [t["direction"] for t in results["tasks"]]
    assert dirs.count(1.0) == 20 and dirs.count(-1.0) == 20


def test_mujoco_step_length_is_rllabs():
    """rllab: half_cheetah.xml timestep 0.01, ant.xml 0.02, one MuJoCo step per env step
    (mujoco_env.py:72-77, 183-186). gymnasium v5: 0.01 x frame_skip 5."""
    assert make_env("halfcheetah_dir", 10).unwrapped.dt == pytest.approx(0.01)
    assert make_env("ant_vel", 10, frame_skip=2).unwrapped.dt == pytest.approx(0.02)
    assert make_env("halfcheetah_dir", 10, frame_skip=5).unwrapped.dt == pytest.approx(0.05)
    from mamlbench.rl.params import RLParams
    assert RLParams().ant_dir.frame_skip == RLParams().ant_vel.frame_skip == 2
    assert RLParams().halfcheetah_dir.frame_skip == 1


def test_rllab_observations_on_hand_built_states():
    cheetah = make_env("halfcheetah_vel", 10)
    cheetah.reset(seed=0)
    sim = cheetah.unwrapped
    qpos, qvel = np.linspace(-0.3, 0.5, sim.model.nq), np.linspace(1.0, -1.0, sim.model.nv)
    sim.set_state(qpos, qvel)
    obs, *_ = cheetah.step(np.zeros(6))
    d = sim.data
    torso = d.body("torso").id
    np.testing.assert_array_equal(obs, np.concatenate([d.qpos[1:], d.qvel, d.subtree_com[torso]]))
    assert obs.shape == cheetah.observation_space.shape == (20,)

    ant = make_env("ant_dir", 10)
    ant.reset(seed=0)
    sim = ant.unwrapped
    obs, *_ = ant.step(np.full(8, 0.3))
    d = sim.data
    torso = d.body("torso").id
    assert d.cfrc_ext.shape == (14, 6) and np.abs(d.cfrc_ext).max() > 0
    expected = np.concatenate([d.qpos, d.qvel, np.clip(d.cfrc_ext, -1, 1).reshape(-1), d.xmat[torso],
                               d.subtree_com[torso]])
    np.testing.assert_array_equal(obs, expected)
    assert obs.shape == ant.observation_space.shape == (15 + 14 + 84 + 9 + 3,)
    assert make_env("ant_dir", 10, observation="gymnasium").observation_space.shape == (27,)


@pytest.mark.parametrize("name", ["halfcheetah_dir", "ant_vel"])
def test_reset_noise_is_rllabs(name):
    """rllab's reset_mujoco (mujoco_env.py:108-115): qpos = init_qpos + 0.01 N(0, 1), qvel = 0.1 N(0, 1);
    gymnasium v5: qpos + U(-0.1, 0.1) (std 0.0577)."""
    env = make_env(name, 10)
    sim = env.unwrapped
    init = np.array([0.0, 0.0, 0.55, 1, 0, 0, 0, 0, 1, 0, -1, 0, -1, 0, 1]) if name == "ant_vel" else np.zeros(9)
    starts = []
    for seed in range(300):
        env.reset(seed=seed)
        starts.append(np.concatenate([sim.data.qpos - init, sim.data.qvel]))
    starts = np.array(starts)
    nq = sim.model.nq
    assert 0.009 < starts[:, :nq].std() < 0.011
    assert 0.09 < starts[:, nq:].std() < 0.11
    assert abs(starts[:, :nq].mean()) < 0.002
    env = make_env(name, 10, reset="gymnasium")
    env.reset(seed=0)
    a = env.unwrapped.data.qpos.copy()
    env.reset(seed=0)
    np.testing.assert_array_equal(a, env.unwrapped.data.qpos)   # still seeded
    assert np.abs(a - env.unwrapped.init_qpos).max() > 0.02
