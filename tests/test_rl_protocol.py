"""Meta-RL protocol points against rllab (cbfinn/maml_rl): policy init and std floor, equal budgets."""
import math

import pytest
import torch

from mamlbench.algorithms.core import forward, split_state
from mamlbench.config import load_params
from mamlbench.rl.maml_trpo import make_policy
from mamlbench.rl.params import ENV_NAMES, RLParams
from conftest import ROOT


pytestmark = pytest.mark.usefixtures("one_thread")


def test_policy_init_is_rllabs_xavier_uniform_with_zero_biases():
    """sandbox/rocky/tf/core/utils.py:38 (make_dense_layer: XavierUniformInitializer, zero biases),
    layers.py:295-304: U(+-sqrt(6 / (fan_in + fan_out))); std 1 (maml_minimal_gauss_mlp_policy.py:34)."""
    policy = make_policy(20, 6, [100, 100], 0)
    layers = [m for m in policy.mu if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in layers] == [(100, 20), (100, 100), (6, 100)]
    for m in layers:
        fan_out, fan_in = m.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = m.weight.detach().double()
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
        assert w.abs().max() <= bound and w.abs().max() > 0.97 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.06)   # uniform's std
    assert torch.equal(policy.log_std.detach(), torch.zeros(6))
    a, b = make_policy(20, 6, [100, 100], 0), make_policy(20, 6, [100, 100], 1)
    assert torch.equal(a.mu[0].weight, policy.mu[0].weight) and not torch.equal(b.mu[0].weight, policy.mu[0].weight)


def test_policy_std_is_floored_at_1e_6():
    """maml_minimal_gauss_mlp_policy.py:38 min_std=1e-6, applied as max(log_std, log(1e-6)) at :265-266."""
    policy = make_policy(2, 2, [8], 0)
    params, buffers = split_state(policy)
    params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    with torch.no_grad():
        params["log_std"].copy_(torch.tensor([-30.0, -1.0]))
    _, log_std = forward(policy, params, buffers, torch.zeros(5, 2))
    torch.testing.assert_close(log_std[0], torch.tensor([math.log(1e-6), -1.0]))
    (grad,) = torch.autograd.grad(log_std.sum(), [params["log_std"]])
    assert grad.tolist() == [0.0, 5.0]    # below the floor the std no longer moves (tf.maximum's gradient)


@pytest.mark.parametrize("profile", ["quick", "paper", "rl_reference"])
def test_baselines_get_the_meta_training_budget(profile):
    """The paper compares MAML and the pretrained baseline at equal budgets (the issue's point 7)."""
    params = load_params(ROOT / "params.yaml", profile=profile)
    for env in ENV_NAMES:
        p = params.rl.env(env)
        assert p.pretrain_iterations == p.iterations, (profile, env, p.iterations, p.pretrain_iterations)
    for env in ENV_NAMES:
        p = RLParams().env(env)
        assert p.pretrain_iterations == p.iterations, env


@pytest.mark.parametrize("profile", ["quick", "paper", "rl_reference"])
def test_profiles_use_the_reference_trpo_and_dynamics(profile):
    p = load_params(ROOT / "params.yaml", profile=profile).rl
    for env in ENV_NAMES:
        e = p.env(env)
        assert (e.ls_backtrack_ratio, e.ls_max_steps, e.max_kl, e.cg_iters, e.cg_damping) == (0.8, 15, 0.01, 10, 1e-5)
        assert (e.reset, e.observation, e.evaluate.balanced) == ("rllab", "rllab", True)
    assert [p.env(e).frame_skip for e in ENV_NAMES] == [1, 1, 1, 2, 2]


def test_dynamics_knobs_enter_the_checkpoint_fingerprint(tmp_path):
    """A run under gymnasium's dynamics never resumes one under rllab's; evaluation-only knobs do not count."""
    import dataclasses
    from mamlbench.rl.train import checkpointer
    p = RLParams().ant_vel

    def fp(q):
        return checkpointer("ant_vel", q, 0, tmp_path, False).run_fingerprint
    changed = [dataclasses.replace(p, frame_skip=5), dataclasses.replace(p, reset="gymnasium"),
               dataclasses.replace(p, observation="gymnasium"), dataclasses.replace(p, ls_backtrack_ratio=0.5)]
    assert len({fp(p), *map(fp, changed)}) == 5
    assert fp(dataclasses.replace(p, evaluate=dataclasses.replace(p.evaluate, balanced=False))) == fp(p)
