"""Issue 18's variants against their papers' definitions, computed here independently (numpy,
float64, by hand from the paper's formula), never by calling the code under test twice; and a
short training run of each through the few-shot path on the synthetic glyphs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mamlbench.algorithms import build_algorithm
from mamlbench.algorithms.core import split_state, task_batch_norm
from mamlbench.schema import ConfigError


class Tiny(nn.Module):
    """head(features(x)) with linear pieces only: every gradient below is a line of numpy."""

    def __init__(self, d_in: int = 3, d_feat: int = 2, n_way: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Linear(d_in, d_feat)
        self.head = nn.Linear(d_feat, n_way)
        self.double()

    def forward(self, x):
        return self.head(self.features(x))


def task(n: int = 6, d_in: int = 3, n_way: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.arange(n) % n_way
    return x, y


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def adapt_once(learner, x, y, steps: int = 1):
    params, buffers = split_state(learner.model)
    with task_batch_norm(learner.model, batched=False):
        return learner.adapt(params, buffers, x, y, steps, batched=False)


# ---- BOIL ------------------------------------------------------------------------------------------
def test_boil_inner_step_moves_the_body_by_the_hand_gradient_and_freezes_the_head():
    """Oh et al. 2021, section 3: theta_b' = theta_b - alpha_b grad_b L_support, theta_h' = theta_h (alpha_h = 0).
    Logits H(Wx + b) + c, mean cross-entropy: dL/dlogits = (softmax - onehot) / n, then the chain rule by hand."""
    alpha = 0.3
    model, (x, y) = Tiny(), task()
    s = numpy_state(model)
    xs, onehot = x.numpy(), np.eye(2)[y.numpy()]
    z = xs @ s["features.weight"].T + s["features.bias"]
    logits = z @ s["head.weight"].T + s["head.bias"]
    g_logits = (softmax(logits) - onehot) / len(xs)
    g_z = g_logits @ s["head.weight"]
    expected = {"features.weight": s["features.weight"] - alpha * g_z.T @ xs,
                "features.bias": s["features.bias"] - alpha * g_z.sum(0),
                "head.weight": s["head.weight"], "head.bias": s["head.bias"]}

    learner = build_algorithm("boil", model, inner_lr=alpha, inner_steps=1, strategy="loop")
    adapted = adapt_once(learner, x, y)
    for k, v in expected.items():
        np.testing.assert_allclose(adapted[k].detach().numpy(), v, rtol=1e-12, atol=1e-14, err_msg=k)
    params, _ = split_state(model)
    assert adapted["head.weight"] is params["head.weight"] and adapted["head.bias"] is params["head.bias"]


def test_boil_head_is_meta_learned_and_the_options_are_validated():
    model, (x, y) = Tiny(), task()
    learner = build_algorithm("boil", model, inner_lr=0.3, inner_steps=2, strategy="loop")
    out = learner(x[None], y[None], x[None], y[None])
    out.loss.backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.features.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="boil.heads"):
        build_algorithm("boil", Tiny(), inner_lr=0.1, inner_steps=1, params={"heads": "head"})
    with pytest.raises(ValueError, match="no trainable parameters under head 'classifier'"):
        build_algorithm("boil", Tiny(), inner_lr=0.1, inner_steps=1, params={"head": "classifier"})
    with pytest.raises(ValueError, match="no body to adapt"):
        build_algorithm("boil", nn.ModuleDict({"head": nn.Linear(2, 2)}), inner_lr=0.1, inner_steps=1)


# ---- Prototypical Networks -------------------------------------------------------------------------
def numpy_prototype_logits(model: Tiny, sx, sy, qx, n_way: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Snell et al. 2017, eq. 1-2: c_k = mean of f(x_i) over class k; logits -||f(x) - c_k||^2. (logits, c, f(q))."""
    s = numpy_state(model)

    def f(x):
        return x.numpy() @ s["features.weight"].T + s["features.bias"]
    zs, zq = f(sx), f(qx)
    c = np.stack([zs[sy.numpy() == k].mean(0) for k in range(n_way)])
    return -((zq[:, None, :] - c[None]) ** 2).sum(-1), c, zq


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_protonet_logits_are_negative_squared_distances_to_the_class_means(strategy):
    model = Tiny()
    (sx, sy), (qx, qy) = task(6, seed=1), task(4, seed=2)
    expected, _, _ = numpy_prototype_logits(model, sx, sy, qx)
    learner = build_algorithm("protonet", model, inner_lr=0.1, inner_steps=0, strategy=strategy)
    out = learner(sx[None], sy[None], qx[None], qy[None])
    np.testing.assert_allclose(out.query_outputs[0].numpy(), expected, rtol=1e-12, atol=1e-12)
    logp = expected - np.log(np.exp(expected).sum(1, keepdims=True))
    assert out.loss.item() == pytest.approx(-logp[np.arange(4), qy.numpy()].mean(), rel=1e-12)
    out.loss.backward()
    assert model.features.weight.grad.abs().sum() > 0 and model.head.weight.grad is None  # the head is unused
    traj = learner.trajectory(sx[None], sy[None], qx[None], qy[None], inner_steps=2)
    assert traj.shape == (1, 3) and torch.allclose(traj, traj[:, :1])   # no inner loop: every step the same


def test_protonet_meta_lr_halves_every_2000_updates_and_options_are_validated():
    learner = build_algorithm("protonet", Tiny(), inner_lr=0.1, inner_steps=0)
    assert [learner.meta_lr(i, 10 ** 5, 1e-3) for i in (0, 1999, 2000, 4000)] == [1e-3, 1e-3, 5e-4, 2.5e-4]
    assert build_algorithm("protonet", Tiny(), inner_lr=0.1, inner_steps=0,
                           params={"lr_halve_every": None}).meta_lr(9999, 10 ** 5, 1e-3) == 1e-3
    with pytest.raises(ConfigError, match="protonet.halve_every"):
        build_algorithm("protonet", Tiny(), inner_lr=0.1, inner_steps=0, params={"halve_every": 10})


# ---- Proto-MAML ------------------------------------------------------------------------------------
def test_protomaml_head_starts_as_the_prototype_classifier():
    """Triantafillou et al. 2020: W_k = 2 c_k, b_k = -||c_k||^2, so W f(x) + b = -||f(x) - c_k||^2 + ||f(x)||^2:
    at step 0 the logits are ProtoNet's plus one constant per query, and the softmax is ProtoNet's."""
    model = Tiny()
    (sx, sy), (qx, qy) = task(6, seed=1), task(4, seed=2)
    proto_logits, c, zq = numpy_prototype_logits(model, sx, sy, qx)
    learner = build_algorithm("protomaml", model, inner_lr=0.1, inner_steps=1, strategy="loop")
    params, buffers = split_state(model)
    theta0 = next(learner.steps(params, buffers, sx, sy, 1, batched=False, first_order=True))
    np.testing.assert_allclose(theta0["head.weight"].detach().numpy(), 2 * c, rtol=1e-12)
    np.testing.assert_allclose(theta0["head.bias"].detach().numpy(), -(c ** 2).sum(1), rtol=1e-12)
    logits = torch.func.functional_call(model, theta0, (qx,)).detach().numpy()
    np.testing.assert_allclose(logits, proto_logits + (zq ** 2).sum(1, keepdims=True), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(softmax(logits), softmax(proto_logits), rtol=1e-12, atol=1e-14)
    protonet = build_algorithm("protonet", model, inner_lr=0.1, inner_steps=0, strategy="loop")
    step0 = learner.trajectory(sx[None], sy[None], qx[None], qy[None], inner_steps=0)
    torch.testing.assert_close(step0, protonet.trajectory(sx[None], sy[None], qx[None], qy[None], inner_steps=0))


def test_protomaml_inner_steps_fine_tune_the_prototype_head_and_the_gradient_reaches_the_body():
    model = Tiny()
    (sx, sy), (qx, qy) = task(6, seed=1), task(4, seed=2)
    learner = build_algorithm("protomaml", model, inner_lr=0.5, inner_steps=3, strategy="loop")
    losses = learner.trajectory(sx[None], sy[None], qx[None], qy[None], inner_steps=3)[0]
    support = learner.trajectory(sx[None], sy[None], sx[None], sy[None], inner_steps=3)[0]
    assert support[-1] < support[0] and not torch.equal(losses[0], losses[-1])
    learner(sx[None], sy[None], qx[None], qy[None]).loss.backward()
    assert model.features.weight.grad.abs().sum() > 0 and model.head.weight.grad is None  # replaced every task
    with pytest.raises(ValueError, match="head an nn.Linear"):
        build_algorithm("protomaml", nn.Linear(3, 2), inner_lr=0.1, inner_steps=1)


# ---- CAVIA -----------------------------------------------------------------------------------------
def test_cavia_inner_step_moves_only_the_context_by_the_hand_gradient():
    """Zintgraf et al. 2019, Algorithm 1: phi_0 = 0, phi_1 = -alpha grad_phi L_support; FiLM on the features:
    u = gamma * h + beta with [gamma, beta] = A phi + a, logits H u + c. By hand: dL/du = (softmax - onehot) / n H,
    dL/dgamma = sum_n dL/du * h, dL/dbeta = sum_n dL/du, dL/dphi = A^T [dL/dgamma, dL/dbeta]."""
    alpha, n_context = 0.7, 3
    model, (x, y) = Tiny(), task()
    learner = build_algorithm("cavia", model, inner_lr=alpha, inner_steps=1, strategy="loop",
                              params={"num_context_params": n_context, "context_at": "features"})
    s = numpy_state(learner.model)
    xs, onehot = x.numpy(), np.eye(2)[y.numpy()]
    h = xs @ s["net.features.weight"].T + s["net.features.bias"]
    gamma, beta = np.split(s["film.bias"], 2)          # A @ 0 + a
    u = gamma * h + beta
    logits = u @ s["net.head.weight"].T + s["net.head.bias"]
    g_u = (softmax(logits) - onehot) / len(xs) @ s["net.head.weight"]
    g_film = np.concatenate([(g_u * h).sum(0), g_u.sum(0)])
    expected = -alpha * s["film.weight"].T @ g_film

    params, _ = split_state(learner.model)
    adapted = adapt_once(learner, x, y)
    np.testing.assert_allclose(adapted["context"].detach().numpy(), expected, rtol=1e-12, atol=1e-14)
    assert all(adapted[k] is params[k] for k in params if k != "context"), "only the context adapts"
    # the meta-gradient reaches the network and FiLM, never the context, which stays zero
    out = learner(x[None], y[None], x[None], y[None])
    out.loss.backward()
    assert learner.model.context.grad is None and torch.equal(learner.model.context, torch.zeros(n_context).double())
    assert learner.model.film.weight.grad.abs().sum() > 0 and learner.model.net.head.weight.grad.abs().sum() > 0


def test_cavia_options_are_validated():
    with pytest.raises(ConfigError, match="cavia.context_size"):
        build_algorithm("cavia", Tiny(), inner_lr=0.1, inner_steps=1, params={"context_size": 4})
    with pytest.raises(ValueError, match="no submodule 'features.2.1'"):
        build_algorithm("cavia", Tiny(), inner_lr=0.1, inner_steps=1)


# ---- iMAML -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_imaml_meta_gradient_equals_the_closed_form_of_the_proximal_problem(strategy):
    """Rajeswaran et al. 2019, linear regression f(x) = x . phi with mean squared error. L_support(phi) =
    phi'A phi/2 - b'phi + const with A = 2 X'X / n, b = 2 X'y / n, so phi* = (A + lam I)^-1 (b + lam theta) and
    d phi*/d theta = lam (A + lam I)^-1 = (I + A/lam)^-1: the meta-gradient is (I + A/lam)^-1 grad L_query(phi*),
    averaged over tasks. Enough inner steps converge to phi*; d CG steps solve a d x d system exactly."""
    d, lam, n_tasks = 3, 2.0, 2
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(n_tasks, 8, d, generator=g, dtype=torch.float64), torch.randn(n_tasks, 5, d, generator=g,
                                                                                       dtype=torch.float64)
    sy, qy = torch.randn(n_tasks, 8, 1, generator=g, dtype=torch.float64), torch.randn(n_tasks, 5, 1, generator=g,
                                                                                       dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    theta = model.weight.detach().numpy()[0].copy()
    expected, expected_loss = np.zeros(d), 0.0
    for t in range(n_tasks):
        xs, ys, xq, yq = sx[t].numpy(), sy[t].numpy()[:, 0], qx[t].numpy(), qy[t].numpy()[:, 0]
        a, b = 2 * xs.T @ xs / len(xs), 2 * xs.T @ ys / len(xs)
        phi = np.linalg.solve(a + lam * np.eye(d), b + lam * theta)
        grad_query = 2 * xq.T @ (xq @ phi - yq) / len(xq)
        expected += np.linalg.solve(np.eye(d) + a / lam, grad_query) / n_tasks
        expected_loss += ((xq @ phi - yq) ** 2).mean() / n_tasks

    learner = build_algorithm("imaml", model, inner_lr=0.1, inner_steps=400, strategy=strategy,
                              loss_fn=nn.functional.mse_loss, params={"lam": lam, "cg_steps": d})
    out = learner(sx, sy, qx, qy)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-10)
    np.testing.assert_allclose(model.weight.grad.numpy()[0], expected, rtol=1e-9, atol=1e-12)
    # the plain query gradient at phi* (first-order MAML's direction) is not it: the (I + A/lam)^-1 matters
    assert not np.allclose(expected, np.mean([2 * qx[t].numpy().T @ (qx[t].numpy() @ np.linalg.solve(
        2 * sx[t].numpy().T @ sx[t].numpy() / 8 + lam * np.eye(d), 2 * sx[t].numpy().T @ sy[t].numpy()[:, 0] / 8
        + lam * theta) - qy[t].numpy()[:, 0]) / 5 for t in range(n_tasks)], 0), rtol=1e-3)


def test_imaml_keeps_no_graph_of_the_inner_loop_and_evaluates_with_eval_lam():
    model, (x, y) = Tiny(), task()
    learner = build_algorithm("imaml", model, inner_lr=0.1, inner_steps=5, strategy="loop",
                              params={"lam": 1.0, "cg_steps": 2, "eval_lam": 0.0})
    params, buffers = split_state(model)
    phis = list(learner.steps(params, buffers, x, y, 5))
    assert all(v.grad_fn is None for phi in phis[1:] for v in phi.values()), "inner steps are never differentiated"
    learner.eval()   # eval_lam 0: plain gradient descent on the support loss, as MAML's inner loop
    maml = build_algorithm("maml", model, inner_lr=0.1, inner_steps=5, strategy="loop")
    torch.testing.assert_close(learner.trajectory(x[None], y[None], x[None], y[None], inner_steps=5),
                               maml.trajectory(x[None], y[None], x[None], y[None], inner_steps=5))
    with pytest.raises(ConfigError, match="imaml.lambda"):
        build_algorithm("imaml", Tiny(), inner_lr=0.1, inner_steps=1, params={"lambda": 1.0})


# ---- each variant through the few-shot path (`mamlbench train omniglot -a <name>`), on the glyphs -----
SMOKE = {  # the sections hold the papers' protocols: shrink what would take long on two CPU cores
    "protonet": {"omniglot": {"hidden": 16}},
    "cavia": {"options": {"num_context_params": 8}},
    "imaml": {"train": {"inner_steps": 2}, "evaluate": {"inner_steps": 2}, "options": {"cg_steps": 2}},
}


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    from test_fewshot import make_glyphs
    return make_glyphs(tmp_path_factory.mktemp("glyphs"))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["boil", "protonet", "protomaml", "cavia", "imaml"])
def test_variant_trains_resumes_bit_exact_and_evaluates_through_the_fewshot_path(tmp_path, glyphs, algorithm):
    from conftest import write_params
    from mamlbench import runs
    from mamlbench.io import load_torch
    params_path = write_params(tmp_path / "params.yaml", {
        "profile": "t", "profiles": {"t": {}}, "tracking": {"enabled": False},
        "omniglot": {"hidden": 16, "settings": {"5w1s": {"n_way": 5, "k_shot": 1, "n_query": 5}},
                     "train": {"iterations": 4, "meta_batch_size": 2, "n_query": 5, "validate_every": 2,
                               "n_val_episodes": 8, "checkpoint_every": 2, "log_every": 1},
                     "evaluate": {"inner_steps": 2, "n_episodes": 16, "chunk": 8}},
        "variants": {algorithm: SMOKE.get(algorithm, {})},
    })
    data = dict(prepared=glyphs / "prepared", episodes_dir=glyphs / "episodes")
    out = runs.train_fewshot(params_path, "omniglot", algorithm, "5w1s", tmp_path / "a", progress=False, **data)
    assert out["iterations"] == 4 and 0 <= out["meta_val/best_acc"] <= 1
    assert np.isfinite(out["meta_train/query_loss"])
    # a run that died after its checkpoint at 2 resumes to the same weights
    runs.train_fewshot(params_path, "omniglot", algorithm, "5w1s", tmp_path / "b", progress=False, **data)
    for name in ("checkpoints/ckpt-00000004.pt", "model.pt", "train.json", "curve.csv"):
        (tmp_path / "b" / name).unlink()
    assert runs.train_fewshot(params_path, "omniglot", algorithm, "5w1s", tmp_path / "b", progress=False,
                              **data)["resumed_from"] == 2
    a, b = load_torch(tmp_path / "a" / "model.pt")["learner"], load_torch(tmp_path / "b" / "model.pt")["learner"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = runs.evaluate_fewshot(params_path, "omniglot", algorithm, "5w1s", tmp_path / "a", tmp_path / "eval",
                                    **data)
    steps = 0 if algorithm == "protonet" else 2   # ProtoNet's section: no inner loop to report steps of
    assert metrics["n_episodes"] == 16 and set(metrics["per_step"]) == {f"step{s}" for s in range(steps + 1)}
    assert 0 <= metrics["acc"] <= 1

@pytest.mark.parametrize("algorithm", ["boil", "protonet", "protomaml", "cavia", "imaml", "baseline"])
def test_params_yaml_rejects_an_unknown_option_key_by_name(tmp_path, algorithm):
    from conftest import write_params
    from mamlbench.config import load_params
    with pytest.raises(ConfigError, match=rf"variants\.{algorithm}\.options\.bogus"):
        load_params(write_params(tmp_path / "p.yaml", {"variants": {algorithm: {"options": {"bogus": 1}}}}))
    with pytest.raises(ConfigError, match=rf"variants\.{algorithm}\.omniglot\.options\.bogus"):
        load_params(write_params(tmp_path / "q.yaml", {"variants": {algorithm: {"omniglot": {"options": {"bogus": 1}}}}}))


def test_paper_profile_resolves_each_new_variant_to_its_protocol():
    """docs/protocols.md, "Issue 18 variants": the values typed from each reference, not read back from the code."""
    from conftest import ROOT
    from mamlbench.config import fewshot_cell, load_params
    paper = load_params(ROOT / "params.yaml", profile="paper")
    for benchmark in ("omniglot", "mini_imagenet"):
        proto = fewshot_cell(paper, benchmark, "protonet", "5w1s")   # few_shot.py, run_train.py, section 3
        assert (proto.model, proto.hidden, proto.norm, proto.norm_eps, proto.init) == (
            "conv4_miniimagenet", 64, "affine", 1e-5, "torch")
        assert (proto.train.meta_batch_size, proto.train.meta_lr, proto.train.loss_reduction) == (1, 1e-3, "mean")
        assert proto.train.n_query == {"omniglot": 5, "mini_imagenet": 15}[benchmark]
        assert proto.options.lr_halve_every == 2000 and proto.evaluate.inner_steps == 0
        cavia = fewshot_cell(paper, benchmark, "cavia", "5w1s")      # lmzintgraf/cavia classification/arguments.py
        assert (cavia.train.inner_lr, cavia.train.inner_steps, cavia.evaluate.inner_steps) == (1.0, 2, 2)
        assert (cavia.train.meta_batch_size, cavia.train.meta_lr, cavia.train.grad_clip_value) == (16, 1e-3, 10)
        assert (cavia.options.num_context_params, cavia.options.context_at, cavia.options.first_order) == (
            100, "features.2.1", False)
        imaml = fewshot_cell(paper, benchmark, "imaml", "5w1s")      # imaml_dev examples/README.md
        assert (imaml.train.inner_lr, imaml.train.inner_steps, imaml.train.meta_batch_size) == (0.1, 16, 32)
        assert (imaml.options.lam, imaml.options.cg_steps, imaml.options.eval_lam) == (2.0, 5, 0.0)
        assert imaml.train.adapt_norm and imaml.evaluate.inner_steps == 16
        assert fewshot_cell(paper, benchmark, "protomaml", "5w1s").options.first_order   # fo-Proto-MAML
        for name in ("boil", "protomaml"):   # MAML's protocol
            cell, maml = fewshot_cell(paper, benchmark, name, "5w1s"), fewshot_cell(paper, benchmark, "maml", "5w1s")
            assert (cell.train, cell.evaluate, cell.model) == (maml.train, maml.evaluate, maml.model)
    assert fewshot_cell(paper, "mini_imagenet", "cavia", "5w1s").train.n_query == 15
    from mamlbench.algorithms import ALGORITHMS   # the quick pipeline runs every variant (5-way 1-shot)
    assert set(load_params(ROOT / "params.yaml").omniglot.run.algorithms) == set(ALGORITHMS)
