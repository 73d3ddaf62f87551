"""TRPO pieces: conjugate gradient, Fisher-vector products, and the trust region after the line search."""
import dataclasses

import pytest
import torch

from mamlbench.algorithms.core import split_state
from mamlbench.rl.envs import sample_tasks
from mamlbench.rl.maml_trpo import MetaConfig, collect, make_policy, surrogate, trpo_update
from mamlbench.rl.sampler import Sampler
from mamlbench.rl.policy import GaussianMLPPolicy, kl as gaussian_kl
from mamlbench.rl.trpo import conjugate_gradient, fisher_vector_product, flat, line_search, natural_step


pytestmark = pytest.mark.usefixtures("one_thread")


def test_conjugate_gradient_solves_known_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(12, 12, generator=g, dtype=torch.float64)
    A = m @ m.T + 0.5 * torch.eye(12, dtype=torch.float64)
    x_true = torch.randn(12, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: A @ v, A @ x_true, iters=50, residual_tol=1e-20)
    torch.testing.assert_close(x, x_true, rtol=1e-8, atol=1e-8)


def test_fisher_vector_product_is_the_hessian_of_the_kl():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(5, 5, generator=g, dtype=torch.float64)
    A = m @ m.T
    params = {"w": torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)}
    quad = 0.5 * params["w"] @ A @ params["w"] + torch.sin(params["w"]).sum()
    v = torch.randn(5, generator=g, dtype=torch.float64)
    hessian = A - torch.diag(torch.sin(params["w"].detach()))
    torch.testing.assert_close(fisher_vector_product(quad, params, damping=0.1)(v), hessian @ v + 0.1 * v)


def test_line_search_backtracks_and_rejects():
    step, _, kl, backtracks = line_search(lambda s: (-1.0, float(s.norm())), torch.ones(4), max_kl=0.3,
                                          backtrack_ratio=0.5)
    assert backtracks == 3 and kl <= 0.3 and torch.allclose(step, torch.full((4,), 0.125))
    step, *_ = line_search(lambda s: (1.0, 0.0), torch.ones(4), max_kl=0.3, max_steps=4)
    assert step is None


def test_line_search_backtracks_by_rllabs_ratio():
    """rllab's ConjugateGradientOptimizer: backtrack_ratio=0.8, max_backtracks=15
    (conjugate_gradient_optimizer.py:130-131); pytorch-maml-rl's configs the same."""
    from mamlbench.rl.params import RLEnvParams
    from mamlbench.rl.train import meta_config
    tried = []

    def never_good(step):
        tried.append(float(step[0]))
        return 1.0, 0.0
    assert line_search(never_good, torch.ones(1, dtype=torch.float64), max_kl=1.0)[0] is None
    assert tried == pytest.approx([0.8 ** i for i in range(15)], rel=1e-12)
    cfg = meta_config(RLEnvParams())
    assert (cfg.ls_backtrack_ratio, cfg.ls_max_steps) == (0.8, 15)
    assert (MetaConfig().ls_backtrack_ratio, MetaConfig().ls_max_steps) == (0.8, 15)


def _known_fisher_policy():
    """A linear Gaussian policy mean = W x + b, fixed observations: its KL's Hessian at the old
    policy is known in closed form (below); std 0.5 and 2 so that the scale matters."""
    policy = GaussianMLPPolicy(3, 2, hidden=[]).double()
    with torch.no_grad():
        policy.log_std.copy_(torch.log(torch.tensor([0.5, 2.0], dtype=torch.float64)))
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return policy, x


def _fisher_by_hand(x, std):
    """Hessian of mean_n KL(old || new) at new = old for params [log_std (2), W (2x3, row-major), b (2)]:
    2 for each log_std; (1 / std_a^2) E[phi phi'], phi = (x, 1), per action dim a (W[a, :] and b[a])."""
    phi = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    moment = phi.T @ phi / len(x)                                   # (4, 4)
    F = torch.zeros(10, 10, dtype=x.dtype)
    for a in range(2):
        F[a, a] = 2.0
        idx = torch.tensor([2 + 3 * a, 3 + 3 * a, 4 + 3 * a, 8 + a])   # W[a, 0..2], b[a]
        F[idx[:, None], idx[None, :]] = moment / std[a] ** 2
    return F


def test_full_step_has_quadratic_kl_max_kl_on_a_known_fisher():
    """The full step s = -beta F^-1 g with 0.5 s'Fs = max_kl (rllab conjugate_gradient_optimizer.py:270-272);
    the old `sqrt(2 max_kl / (0.5 s'Fs))` gave 2 max_kl."""
    policy, x = _known_fisher_policy()
    params, buffers = split_state(policy)
    from mamlbench.algorithms.core import forward
    mean, log_std = forward(policy, params, buffers, x)
    kl = gaussian_kl(mean.detach(), log_std.detach(), mean, log_std).mean()
    F = _fisher_by_hand(x, torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert list(params) == ["log_std", "mu.0.weight", "mu.0.bias"]
    Fv = fisher_vector_product(kl, params, damping=0.0)
    v = torch.randn(10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(Fv(v), F @ v)                        # the Fisher really is the one by hand
    g = torch.randn(10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    max_kl = 0.01
    step = natural_step(g, Fv, max_kl, cg_iters=10)
    assert float(0.5 * step @ F @ step) == pytest.approx(max_kl, rel=1e-8)
    direction = -torch.linalg.solve(F, g)
    expected = direction * torch.sqrt(2 * max_kl / (direction @ F @ direction))
    torch.testing.assert_close(step, expected, rtol=1e-6, atol=1e-10)


def _meta_batch(cfg, seed=0):
    sampler = Sampler("navigation", horizon=30)
    policy = make_policy(2, 2, [32, 32], seed)
    tasks = sample_tasks("navigation", 4, (seed, 0))
    batch = collect(policy, sampler, tasks, cfg, (seed, 1))
    sampler.close()
    return policy, batch


def _kl_and_loss_after(policy, before, batch, cfg):
    """Re-evaluate, at the updated parameters, the KL to the old post-update policies."""
    params, buffers = split_state(policy)
    train, train_adv, valid, valid_adv = batch
    loss, kl, _ = surrogate(policy, params, buffers, train, train_adv, valid, valid_adv, cfg, before, True)
    return float(kl.detach()), float(loss.detach())


def test_kl_constraint_holds_after_line_search():
    for max_kl, first_order in ((0.01, False), (1e-4, True)):
        cfg = MetaConfig(n_episodes=5, max_kl=max_kl, first_order=first_order)
        policy, batch = _meta_batch(cfg)
        params, buffers = split_state(policy)
        old_params = flat(p.detach().clone() for p in params.values())
        loss0, _, before = surrogate(policy, params, buffers, *batch, cfg, None, True)
        metrics = trpo_update(policy, *batch, cfg)
        assert metrics["trpo/accepted"] == 1.0
        assert not torch.equal(old_params, flat(p.detach() for p in params.values()))
        kl, loss = _kl_and_loss_after(policy, before, batch, cfg)
        assert 0 < kl <= max_kl, (max_kl, kl)
        assert loss < float(loss0.detach())
        assert abs(kl - metrics["trpo/kl"]) < 1e-6     # the line search measured the same KL


def test_rejected_line_search_keeps_the_policy():
    cfg = MetaConfig(n_episodes=5, ls_max_steps=1, max_kl=1e-12)
    policy, batch = _meta_batch(cfg)
    before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    metrics = trpo_update(policy, *batch, cfg)
    assert metrics["trpo/accepted"] == 0.0
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k])
    assert dataclasses.asdict(cfg)["max_kl"] == 1e-12
