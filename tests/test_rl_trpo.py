"""TRPO pieces: conjugate gradient, Fisher-vector products, and the trust region after the line search."""
import dataclasses

import pytest
import torch

from mamlbench.algorithms.core import split_state
from mamlbench.rl.envs import sample_tasks
from mamlbench.rl.maml_trpo import MetaConfig, collect, make_policy, surrogate, trpo_update
from mamlbench.rl.sampler import Sampler
from mamlbench.rl.trpo import conjugate_gradient, fisher_vector_product, flat, line_search


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
    step, _, kl, backtracks = line_search(lambda s: (-1.0, float(s.norm())), torch.ones(4), max_kl=0.3)
    assert backtracks == 3 and kl <= 0.3 and torch.allclose(step, torch.full((4,), 0.125))
    step, *_ = line_search(lambda s: (1.0, 0.0), torch.ones(4), max_kl=0.3, max_steps=4)
    assert step is None


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
