"""The MAML variants on small synthetic episodes: each trains, and each does what its paper says.

Episodes: every task draws `n_way` random prototypes; examples are prototype + noise, labels the
prototype's index. Gradients are compared in float64 with tight tolerances.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mamlbench.algorithms import ALGORITHMS, PARAMS, build_algorithm
from mamlbench.algorithms.anil import ANIL
from mamlbench.algorithms.core import split_state, task_batch_norm
from mamlbench.algorithms.maml import MAML
from mamlbench.algorithms.mamlpp import MAMLPlusPlus, PerStepBatchNorm, multi_step_loss_weights
from mamlbench.algorithms.metasgd import MetaSGD
from mamlbench.algorithms.reptile import Reptile
from mamlbench.models.conv import Conv4, FCNet
from mamlbench.schema import ConfigError

N_WAY = 3


def episodes(n_tasks: int, shape=(8,), k_shot: int = 2, k_query: int = 3, seed: int = 0,
             dtype=torch.float32, noise: float = 0.3):
    """(support_x, support_y, query_x, query_y): (tasks, n_way*k, *shape) and (tasks, n_way*k)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(n_tasks, N_WAY, *shape, generator=g, dtype=dtype)

    def draw(k):
        y = torch.arange(N_WAY).repeat(k).expand(n_tasks, -1)                  # (tasks, n_way*k)
        x = protos[torch.arange(n_tasks)[:, None], y]                           # (tasks, n_way*k, *shape)
        return x + noise * torch.randn(x.shape, generator=g, dtype=dtype), y
    return (*draw(k_shot), *draw(k_query))


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return FCNet(8, N_WAY, hidden=(16, 16)).to(dtype)


def tiny_conv(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return Conv4(1, N_WAY, hidden=4, image_size=8).to(dtype)


def grads_of(learner, batch):
    learner.zero_grad()
    out = learner(*batch)
    out.loss.backward()
    return out.loss.detach(), {k: p.grad.clone() for k, p in learner.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, rtol=1e-9, atol=1e-11):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


# ---- every variant trains ------------------------------------------------------------------------
SETTINGS = {
    "maml": dict(inner_lr=0.5, meta_lr=0.01),
    "fomaml": dict(inner_lr=0.5, meta_lr=0.01),
    "anil": dict(inner_lr=0.5, meta_lr=0.01),
    "metasgd": dict(inner_lr=0.5, meta_lr=0.01),
    "mamlpp": dict(inner_lr=0.5, meta_lr=0.01, params=dict(multi_step_loss_iterations=20, first_order_iterations=10)),
    "reptile": dict(inner_lr=0.5, meta_lr=0.5, params=dict(final_meta_lr=None)),
    "boil": dict(inner_lr=0.5, meta_lr=0.01),
    "protonet": dict(inner_lr=0.5, meta_lr=0.01),
    "protomaml": dict(inner_lr=0.5, meta_lr=0.01),
    "cavia": dict(inner_lr=1.0, meta_lr=0.01, params=dict(num_context_params=16, context_at="features.5")),
    "imaml": dict(inner_lr=0.1, meta_lr=0.01, params=dict(lam=1.0, cg_steps=3)),
    "baseline": dict(inner_lr=0.5, meta_lr=0.01),
}


# the baseline trains on global class labels, which these per-task prototypes do not have (tests/test_baseline.py)
@pytest.mark.parametrize("name", [name for name in ALGORITHMS if name != "baseline"])
def test_meta_loss_falls(name):
    cfg = SETTINGS[name]
    learner = build_algorithm(name, mlp(), inner_lr=cfg["inner_lr"], inner_steps=2, params=cfg.get("params"))
    opt_cls = torch.optim.SGD if name == "reptile" else torch.optim.Adam
    opt = opt_cls(learner.parameters(), lr=cfg["meta_lr"])
    held_out = episodes(8, seed=999)

    def held_out_loss():  # query loss after 2 inner steps, the quantity meta-training lowers
        return learner.trajectory(*held_out, inner_steps=2)[:, -1].mean().item()

    before = held_out_loss()
    for i in range(25):
        if hasattr(learner, "set_iteration"):
            learner.set_iteration(i)
        out = learner(*episodes(4, seed=i))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = held_out_loss()
    assert after < 0.7 * before, f"{name}: held-out query loss {before:.3f} -> {after:.3f}"


# ---- vmap and loop compute the same meta-gradient ------------------------------------------------
@pytest.mark.parametrize("name, params", [
    ("maml", None), ("fomaml", None), ("anil", None), ("metasgd", None), ("reptile", None),
    ("reptile", dict(inner_optimizer="adam", inner_batch_size=4)),
    ("mamlpp", dict(per_step_bn_stats=False, first_order_iterations=0)),
    ("boil", None), ("protonet", None), ("protomaml", None), ("protomaml", dict(first_order=False)),
    ("cavia", dict(num_context_params=3)), ("imaml", None),
])
def test_vmap_and_loop_agree(name, params):
    batch = episodes(3, shape=(1, 8, 8), dtype=torch.float64)
    results = []
    for strategy in ("vmap", "loop"):
        learner = build_algorithm(name, tiny_conv(), inner_lr=0.3, inner_steps=2, strategy=strategy, params=params)
        torch.manual_seed(1)  # Reptile's minibatch shuffles
        results.append(grads_of(learner, batch))
    (loss_v, g_v), (loss_l, g_l) = results
    torch.testing.assert_close(loss_v, loss_l, rtol=1e-10, atol=1e-12)
    # Adam divides by sqrt(v): entries whose gradient is ~0 amplify rounding, hence a looser atol.
    assert_grads_close(g_v, g_l, atol=1e-8 if params and params.get("inner_optimizer") == "adam" else 1e-11)


# ---- FOMAML ----------------------------------------------------------------------------------------
def test_fomaml_differs_from_maml_only_by_second_order():
    batch = episodes(2, dtype=torch.float64)
    _, g2 = grads_of(build_algorithm("maml", mlp(dtype=torch.float64), inner_lr=0.5, inner_steps=2), batch)
    _, g1 = grads_of(build_algorithm("fomaml", mlp(dtype=torch.float64), inner_lr=0.5, inner_steps=2), batch)
    assert not torch.allclose(g1["model.features.1.weight"], g2["model.features.1.weight"])


# ---- ANIL ----------------------------------------------------------------------------------------
def test_anil_body_passes_through_inner_loop_yet_gets_meta_gradient():
    learner = ANIL(mlp(dtype=torch.float64), inner_lr=0.5, inner_steps=3)
    sx, sy, qx, qy = episodes(2, dtype=torch.float64)
    params, buffers = split_state(learner.model)
    with task_batch_norm(learner.model, batched=False):
        adapted = learner.adapt(params, buffers, sx[0], sy[0], 3, batched=False)
    for k, p in params.items():
        if k.startswith("head."):
            assert not torch.equal(adapted[k], p), k
        else:
            assert adapted[k] is p, f"body parameter {k} changed in the inner loop"
    _, grads = grads_of(learner, (sx, sy, qx, qy))
    body = [k for k in grads if not k.startswith("model.head.")]
    assert body and all(grads[k].abs().sum() > 0 for k in body)


def test_anil_cached_features_equal_full_forward():
    batch = episodes(2, dtype=torch.float64)
    fast = ANIL(mlp(dtype=torch.float64), inner_lr=0.5, inner_steps=2, strategy="loop")
    slow = ANIL(mlp(dtype=torch.float64), inner_lr=0.5, inner_steps=2, strategy="loop")
    slow.split = False
    (la, ga), (lb, gb) = grads_of(fast, batch), grads_of(slow, batch)
    torch.testing.assert_close(la, lb)
    assert_grads_close(ga, gb)
    with pytest.raises(ValueError, match="no trainable parameters under head"):
        ANIL(mlp(), head="classifier")


# ---- Reptile -------------------------------------------------------------------------------------
@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
def test_reptile_update_equals_its_definition(inner_optimizer):
    """theta + eps (mean_t phi_t - theta), phi_t from torch.optim.SGD or TF's Adam (by hand) on a copy of the model."""
    inner_lr, k, eps = (0.1 if inner_optimizer == "sgd" else 0.01), 3, 0.7
    batch = episodes(3, dtype=torch.float64)
    model = mlp(dtype=torch.float64)
    phis = []
    for t in range(3):
        net = copy.deepcopy(model).train()  # train mode: BatchNorm on batch statistics, as the core
        opt = torch.optim.SGD(net.parameters(), lr=inner_lr)
        v = {name: torch.zeros_like(p) for name, p in net.named_parameters()}
        for step in range(1, k + 1):
            opt.zero_grad()
            nn.functional.cross_entropy(net(batch[0][t]), batch[1][t]).backward()
            if inner_optimizer == "sgd":
                opt.step()
                continue
            with torch.no_grad():  # tf.train.AdamOptimizer, beta1 = 0: lr sqrt(1 - b2^t) g / (sqrt(v) + 1e-8)
                for name, p in net.named_parameters():
                    v[name] = 0.999 * v[name] + 0.001 * p.grad ** 2
                    p -= inner_lr * (1 - 0.999 ** step) ** 0.5 * p.grad / (v[name].sqrt() + 1e-8)
        phis.append(dict(net.named_parameters()))
    theta = {k_: p.detach().clone() for k_, p in model.named_parameters()}
    expected = {k_: theta[k_] + eps * (torch.stack([phi[k_] for phi in phis]).mean(0) - theta[k_]) for k_ in theta}

    learner = Reptile(model, inner_lr=inner_lr, inner_steps=k, inner_optimizer=inner_optimizer, strategy="loop")
    meta_opt = torch.optim.SGD(learner.parameters(), lr=eps)
    out = learner(*batch)
    meta_opt.zero_grad()
    out.loss.backward()
    meta_opt.step()
    for k_, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k_], rtol=1e-9, atol=1e-11, msg=lambda m: f"{k_}: {m}")
    assert out.task_losses.shape == (3,) and torch.isclose(out.loss, out.task_losses.mean())


def test_reptile_meta_lr_anneals_linearly():
    learner = Reptile(mlp(), final_meta_lr=0.0)
    assert [learner.meta_lr(i, 10, 1.0) for i in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert Reptile(mlp(), final_meta_lr=None).meta_lr(5, 10, 1.0) == 1.0


# ---- Meta-SGD ------------------------------------------------------------------------------------
def test_metasgd_rates_get_gradients_and_equal_maml_at_a_scalar():
    batch = episodes(2, dtype=torch.float64)
    meta = MetaSGD(mlp(dtype=torch.float64), inner_lr=0.4, inner_steps=2, init_inner_lr=0.4)
    maml = MAML(mlp(dtype=torch.float64), inner_lr=0.4, inner_steps=2)
    (lm, gm), (la, ga) = grads_of(meta, batch), grads_of(maml, batch)
    torch.testing.assert_close(lm, la)
    assert_grads_close({k: v for k, v in gm.items() if k.startswith("model.")}, ga)
    rates = {k: v for k, v in gm.items() if k.startswith("lrs.")}
    assert len(rates) == len(list(meta.model.parameters()))
    assert all(g.abs().sum() > 0 for g in rates.values())
    assert MetaSGD(mlp(), init_inner_lr=0.05).lrs["head__weight"].eq(0.05).all()


# ---- MAML++ --------------------------------------------------------------------------------------
ALL_OFF = dict(multi_step_loss=False, derivative_order_annealing=False, per_step_bn_stats=False,
               per_step_bn_weights=False, lslr=False, cosine_annealing=False,
               iterations_per_epoch=1)  # schedules move every meta-update here (per epoch: test_mamlpp_protocol)


def mamlpp(model=None, inner_steps=2, **switches):
    model = model if model is not None else mlp(dtype=torch.float64)
    return MAMLPlusPlus(model, inner_lr=0.4, inner_steps=inner_steps, **{**ALL_OFF, **switches}).double()


def test_mamlpp_all_off_is_maml():
    batch = episodes(2, dtype=torch.float64)
    (lp, gp), (lm, gm) = grads_of(mamlpp(), batch), grads_of(MAML(mlp(dtype=torch.float64), 0.4, 2), batch)
    torch.testing.assert_close(lp, lm)
    assert_grads_close(gp, gm)


def test_mamlpp_derivative_order_annealing():
    batch = episodes(2, dtype=torch.float64)
    learner = mamlpp(derivative_order_annealing=True, first_order_iterations=5)
    _, first = grads_of(MAML(mlp(dtype=torch.float64), 0.4, 2, first_order=True), batch)
    _, second = grads_of(MAML(mlp(dtype=torch.float64), 0.4, 2), batch)
    learner.set_iteration(4)
    assert_grads_close(grads_of(learner, batch)[1], first)
    learner.set_iteration(5)
    assert_grads_close(grads_of(learner, batch)[1], second)


def test_mamlpp_multi_step_loss_follows_schedule():
    assert multi_step_loss_weights(4, 0, 100) == pytest.approx([0.25] * 4)
    mid = multi_step_loss_weights(4, 50, 100)
    assert mid[0] == pytest.approx(0.125) and sum(mid) == pytest.approx(1.0)
    late = multi_step_loss_weights(4, 99, 100)
    assert late[0] == pytest.approx(0.03 / 4) and sum(late) == pytest.approx(1.0)
    assert multi_step_loss_weights(4, 100, 100) == [0.0, 0.0, 0.0, 1.0]

    batch = episodes(2, dtype=torch.float64)
    learner = mamlpp(inner_steps=3, multi_step_loss=True, multi_step_loss_iterations=10)
    for it in (0, 6, 10):
        learner.set_iteration(it)
        per_step = learner.trajectory(*batch, inner_steps=3)[:, 1:]      # (tasks, 3): L_query(theta_s)
        w = torch.tensor(multi_step_loss_weights(3, it, 10), dtype=torch.float64)
        torch.testing.assert_close(learner(*batch).loss, (per_step * w).sum(1).mean())


def test_mamlpp_lslr_rates_get_gradients():
    learner = mamlpp(lslr=True)
    assert set(learner.lslr) == {k.replace(".", "__") for k, _ in learner.model.named_parameters()}
    _, grads = grads_of(learner, episodes(2, dtype=torch.float64))
    rates = {k: g for k, g in grads.items() if k.startswith("lslr.")}
    assert len(rates) == len(learner.lslr)
    assert all(g.shape == (2,) and (g != 0).all() for g in rates.values())


def test_mamlpp_per_step_bn_weights_distinct_and_not_adapted():
    learner = mamlpp(per_step_bn_weights=True, per_step_slots="state")
    norms = [m for m in learner.model.modules() if isinstance(m, PerStepBatchNorm)]
    assert len(norms) == 2 and norms[0].weight.shape == (3, 16)       # slots for theta_0..theta_2
    assert mamlpp(per_step_bn_weights=True).model.features[2].weight.shape == (2, 16)  # reference: one per step
    params, buffers = split_state(learner.model)
    sx, sy, _, _ = episodes(1, dtype=torch.float64)
    with task_batch_norm(learner.model, batched=False):
        adapted = learner.adapt(params, buffers, sx[0], sy[0], 2, batched=False)
    assert all(adapted[k] is params[k] for k in learner.fixed) and learner.fixed
    opt = torch.optim.Adam(learner.parameters(), lr=0.01)
    for i in range(3):
        _, _ = grads_of(learner, episodes(2, seed=i, dtype=torch.float64))
        opt.step()
    w = norms[0].weight.detach()
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])


def test_mamlpp_per_step_bn_running_stats():
    learner = mamlpp(per_step_bn_stats=True, eval_running_stats=True, per_step_slots="state")
    assert learner.resolve_strategy(torch.device("cpu")) == "loop"
    with pytest.raises(ValueError, match="per_step_bn_stats"):
        mamlpp(per_step_bn_stats=True, eval_running_stats=True, strategy="vmap")
    norm = next(m for m in learner.model.modules() if isinstance(m, PerStepBatchNorm))
    batch = episodes(2, dtype=torch.float64)
    learner(*batch).loss.backward()
    rm = norm.running_mean.clone()
    assert not torch.allclose(rm[0], rm[1]) and not torch.allclose(rm[1], rm[2]) and rm.abs().sum() > 0
    # Evaluation episodes read the statistics but never write them.
    learner.eval()
    learner.trajectory(*batch, inner_steps=4)
    torch.testing.assert_close(norm.running_mean, rm)
    # In eval mode a query example's output does not depend on the rest of its batch.
    x = torch.randn(5, 16, dtype=torch.float64)
    norm.step = 1
    torch.testing.assert_close(norm(x)[:1], norm(x[:1]))
    norm.eval_running_stats = False
    assert not torch.allclose(norm(x)[:2], norm(x[:2]))


def test_mamlpp_cosine_annealing():
    learner = mamlpp(cosine_annealing=True, min_meta_lr=1e-5)
    assert learner.meta_lr(0, 100, 1e-3) == pytest.approx(1e-3)
    assert learner.meta_lr(50, 100, 1e-3) == pytest.approx((1e-3 + 1e-5) / 2)
    assert learner.meta_lr(100, 100, 1e-3) == pytest.approx(1e-5)
    assert mamlpp(cosine_annealing=False).meta_lr(50, 100, 1e-3) == 1e-3


def test_mamlpp_all_on_conv_trains_one_step():
    learner = build_algorithm("mamlpp", tiny_conv(dtype=torch.float32), inner_lr=0.3, inner_steps=2)
    out = learner(*episodes(2, shape=(1, 8, 8)))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.query_outputs.shape == (2, 3 * N_WAY, N_WAY)


# ---- registry ------------------------------------------------------------------------------------
def test_registry_validates_params():
    assert set(ALGORITHMS) == {"maml", "fomaml", "reptile", "anil", "metasgd", "mamlpp", "boil", "protonet",
                               "protomaml", "cavia", "imaml", "baseline"} == set(PARAMS)
    with pytest.raises(ConfigError, match="mamlpp.lslrr"):
        build_algorithm("mamlpp", mlp(), inner_lr=0.1, inner_steps=1, params={"lslrr": True})
    with pytest.raises(ConfigError, match="reptile.inner_optimizer"):
        build_algorithm("reptile", mlp(), inner_lr=0.1, inner_steps=1, params={"inner_optimizer": "rmsprop"})
    with pytest.raises(ValueError, match="unknown algorithm"):
        build_algorithm("matchingnet", mlp(), inner_lr=0.1, inner_steps=1)
    assert build_algorithm("fomaml", mlp(), inner_lr=0.1, inner_steps=1).first_order


# ---- evaluation: the stepwise trajectory ---------------------------------------------------------
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_stepwise_trajectory_equals_maml_trajectory(strategy):
    """MAML++ with every switch off runs `StepwiseMAML.trajectory`; it must match `MAML.trajectory`."""
    batch = episodes(2, shape=(1, 8, 8), dtype=torch.float64)
    stepwise = mamlpp(tiny_conv(), strategy=strategy).trajectory(*batch, inner_steps=3)
    reference = MAML(tiny_conv(), 0.4, 2, strategy=strategy).trajectory(*batch, inner_steps=3)
    assert stepwise.shape == (2, 4)
    torch.testing.assert_close(stepwise, reference, rtol=1e-10, atol=1e-12)
    assert (stepwise[:, -1] < stepwise[:, 0]).all()


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_state_dict_round_trip(name):
    """Everything a variant learns (weights, rates, per-step tables and statistics) is in its state_dict."""
    params = SETTINGS[name].get("params") if name == "cavia" else None  # FiLM on a layer the MLP has
    a = build_algorithm(name, mlp(seed=0), inner_lr=0.3, inner_steps=2, params=params)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    grads_of(a, episodes(2, seed=1))
    opt.step()
    b = build_algorithm(name, mlp(seed=1), inner_lr=0.3, inner_steps=2, params=params)
    b.load_state_dict(a.state_dict())
    batch = episodes(2, seed=2)
    torch.manual_seed(0)
    out_a = a(*batch)
    torch.manual_seed(0)
    out_b = b(*batch)
    assert torch.equal(out_a.task_losses, out_b.task_losses)
    a.eval(), b.eval()
    assert torch.equal(a.trajectory(*batch, inner_steps=2), b.trajectory(*batch, inner_steps=2))
