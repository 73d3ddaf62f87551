"""Each few-shot protocol point of `profile: paper`, pinned against the reference code.

Expected values are typed from the reference (cbfinn/maml at a7f45f1; the file and line are beside
each) or computed here by hand in float64 from the reference's formula, never from the code under
test. docs/protocols.md lists the same points with both values where a knob departs.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from mamlbench.algorithms import build_algorithm
from mamlbench.algorithms.core import split_state
from mamlbench.config import VARIANTS, fewshot_cell, load_params
from mamlbench.data.omniglot import decode
from mamlbench.fewshot import build_learner, classification_loss
from mamlbench.models.conv import build_model
from mamlbench.stats import mean_ci95
from mamlbench.train import meta_update

PAPER = load_params(ROOT / "params.yaml", profile="paper")

# (benchmark, setting): N, K, alpha (original convention), train steps, meta-batch, train queries/class,
# test queries/class, test steps, meta-gradient clip by value. main.py:10-20 (the README's commands),
# main.py:228-251 (test steps and queries), maml.py:147-148 (clipping).
MAML_CELLS = {
    ("omniglot", "5w1s"): (5, 1, 0.4, 1, 32, 1, 1, 10, None),
    ("omniglot", "5w5s"): (5, 5, 0.4, 1, 32, 5, 5, 10, None),
    ("omniglot", "20w1s"): (20, 1, 0.1, 5, 16, 1, 1, 10, None),
    ("omniglot", "20w5s"): (20, 5, 0.1, 5, 16, 5, 5, 10, None),
    ("mini_imagenet", "5w1s"): (5, 1, 0.01, 5, 4, 15, 1, 10, 10.0),
    ("mini_imagenet", "5w5s"): (5, 5, 0.01, 5, 4, 15, 5, 10, 10.0),
}


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "anil"])
@pytest.mark.parametrize("cell", list(MAML_CELLS))
def test_paper_cells_resolve_to_the_original_code(cell, algorithm):
    """MAML, first-order MAML and ANIL (Raghu et al. keep MAML's hyperparameters) under `paper`."""
    benchmark, setting = cell
    n, k, alpha, steps, batch, q_train, q_test, test_steps, clip = MAML_CELLS[cell]
    resolved = fewshot_cell(PAPER, benchmark, algorithm, setting)
    train, ev = resolved.train, resolved.evaluate
    cells = getattr(PAPER, benchmark).settings[setting]
    assert (cells.n_way, cells.k_shot, cells.n_query) == (n, k, q_test)
    assert (train.inner_lr, train.inner_steps, train.meta_batch_size, train.n_query) == (alpha, steps, batch, q_train)
    assert train.k_shot in (None, k) and train.loss_reduction == "shot_sum" and not train.adapt_norm
    assert (train.meta_lr, train.iterations, train.grad_clip, train.grad_clip_value) == (1e-3, 60000, None, clip)
    assert (ev.inner_steps, ev.inner_lr, ev.checkpoint, ev.ensemble, ev.n_episodes) == (test_steps, None, "final", 1, 600)
    assert (resolved.norm, resolved.norm_eps, resolved.init) == ("shift", 1e-3, "reference")
    assert resolved.model == ("conv4_omniglot" if benchmark == "omniglot" else "conv4_miniimagenet")
    assert resolved.hidden in (None, 64 if benchmark == "omniglot" else 32)  # --num_filters (main.py:17)


@pytest.mark.parametrize("cell", list(MAML_CELLS))
def test_paper_metasgd_takes_one_inner_step_in_training_and_at_test(cell):
    """Li et al. 2017, section 4: one adaptation step, alpha initialised from U[0.005, 0.1]."""
    resolved = fewshot_cell(PAPER, cell[0], "metasgd", cell[1])
    assert resolved.train.inner_steps == 1 and resolved.evaluate.inner_steps == 1
    assert resolved.options.init_inner_lr is None and resolved.options.init_range == [0.005, 0.1]


def test_metasgd_rates_start_uniform_in_the_papers_range():
    torch.manual_seed(0)
    learner = build_algorithm("metasgd", build_model("conv4_omniglot", 5, hidden=8), inner_lr=0.4, inner_steps=1,
                              params={"init_inner_lr": None, "init_range": [0.005, 0.1]})
    rates = torch.cat([p.flatten() for p in learner.lrs.values()])
    assert rates.min() >= 0.005 and rates.max() <= 0.1
    assert rates.min() < 0.01 and rates.max() > 0.095, "spread over the whole range, not one constant"
    assert abs(rates.mean().item() - 0.0525) < 0.005   # the mean of U[0.005, 0.1]


def test_every_paper_cell_resolves():
    for benchmark in ("omniglot", "mini_imagenet"):
        for setting in getattr(PAPER, benchmark).settings:
            for algorithm in VARIANTS:
                fewshot_cell(PAPER, benchmark, algorithm, setting)


def _linear_task(n: int, k: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * k, dim, generator=g, dtype=torch.float64)
    y = torch.arange(n).repeat_interleave(k)
    w = torch.randn(n, dim, generator=g, dtype=torch.float64) * 0.3
    return x, y, w


@pytest.mark.parametrize("n,k", [(5, 1), (5, 5), (20, 1)])
def test_shot_sum_inner_step_is_the_originals_and_a_mean_step_at_n_alpha(n, k):
    """utils.py:56-58: xent = softmax_cross_entropy(logits, labels) / K per example; maml.py:90:
    tf.gradients sums over the N*K examples. For logits W x, d xent_i / dW = (softmax_i - onehot_i) x_i^T / K:
    the step below is written from that formula with numpy, not with autograd."""
    alpha, dim = 0.4, 7
    x, y, w = _linear_task(n, k, dim, seed=n * 10 + k)
    xs, ws = x.numpy(), w.numpy()
    logits = xs @ ws.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(n)[y.numpy()]
    grad = ((p - onehot).T @ xs) / k                 # sum over examples of per-example gradients / K
    expected = ws - alpha * grad

    model = torch.nn.Linear(dim, n, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w)
    for reduction, lr in (("shot_sum", alpha), ("mean", n * alpha)):
        learner = build_algorithm("maml", model, inner_lr=lr, inner_steps=1, strategy="loop",
                                  loss_fn=classification_loss(reduction, k))
        params, buffers = split_state(model)
        adapted = learner.adapt(params, buffers, x, y, 1, batched=False)
        np.testing.assert_allclose(adapted["weight"].detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    mean_at_alpha = build_algorithm("maml", model, inner_lr=alpha, inner_steps=1, strategy="loop")
    params, buffers = split_state(model)
    wrong = mean_at_alpha.adapt(params, buffers, x, y, 1, batched=False)["weight"].detach().numpy()
    assert not np.allclose(wrong, expected), "the mean loss at the paper's alpha takes an N-times smaller step"


def test_batch_norm_is_a_meta_learned_shift_with_eps_1e_3():
    """utils.py:41 tf_layers.batch_norm with TF's defaults (center=True, scale=False, epsilon=0.001); its
    variables are not in `weights` (maml.py:90-94 adapts `weights` only) but are trainable, so Adam in the
    outer loop learns them (maml.py:145-146)."""
    cell = fewshot_cell(PAPER, "omniglot", "maml", "5w1s")
    learner = build_learner(PAPER, "omniglot", "maml", "5w1s", cell, 1, 28)
    norms = [m for m in learner.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 4 and all(m.eps == 1e-3 for m in norms)
    assert all(not m.weight.requires_grad and bool((m.weight == 1).all()) for m in norms), "no learned scale"
    assert all(m.bias.requires_grad for m in norms), "a learned shift"
    # The inner loop leaves the shifts alone; the meta-gradient still reaches them.
    torch.manual_seed(0)
    sx, qx = torch.rand(2, 5, 1, 28, 28), torch.rand(2, 5, 1, 28, 28)
    sy = qy = torch.arange(5).expand(2, 5)
    with torch.no_grad():
        for m in norms:
            m.bias.uniform_(-0.5, 0.5)
    params, buffers = split_state(learner.model)
    from mamlbench.algorithms.core import task_batch_norm
    with task_batch_norm(learner.model, batched=False):
        adapted = learner.adapt(params, buffers, sx[0], sy[0], 1, batched=False)
    shifts = [k for k in params if k.endswith(".1.bias")]
    assert len(shifts) == 4
    for key in shifts:
        assert adapted[key] is params[key], f"{key} adapted in the inner loop"
    assert not torch.equal(adapted["head.weight"], params["head.weight"])
    learner(sx, sy, qx, qy).loss.backward()
    assert all(m.bias.grad is not None and m.bias.grad.abs().sum() > 0 for m in norms)


def test_reference_init_omniglot_and_mini_imagenet():
    """maml.py:189-207: conv weights xavier_initializer_conv2d (uniform, limit sqrt(6 / (fan_in + fan_out))),
    the Omniglot head tf.random_normal (std 1), the mini-ImageNet head xavier_initializer, biases zeros."""
    torch.manual_seed(0)
    omni = build_model("conv4_omniglot", 5, norm="shift", norm_eps=1e-3, init="reference")
    torch.manual_seed(0)
    mini = build_model("conv4_miniimagenet", 5, norm="shift", norm_eps=1e-3, init="reference")
    for model, head_std in ((omni, 1.0), (mini, math.sqrt(2 / (800 + 5)))):
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in, fan_out = m.in_channels * 9, m.out_channels * 9
                limit = math.sqrt(6 / (fan_in + fan_out))
                w = m.weight.detach()
                assert w.abs().max() <= limit and w.abs().max() > 0.95 * limit
                assert abs(w.std().item() - limit / math.sqrt(3)) < 0.1 * limit / math.sqrt(3)
        head = model.head.weight.detach()
        assert abs(head.std().item() - head_std) < 0.12 * head_std, (head.std(), head_std)
        assert torch.equal(model.head.bias.detach(), torch.zeros(5))
    assert omni.head.weight.abs().max() > 1.5, "N(0, 1), not PyTorch's U(+-1/8)"
    assert mini.head.weight.abs().max() <= math.sqrt(6 / (800 + 5))


def _pil_nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """PIL's nearest-neighbour resize samples the source at the centre of each output pixel."""
    return np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(int)


def test_omniglot_pixels_are_the_originals_binary_nearest_neighbour(tmp_path):
    """resize_images.py:22-24 calls im.resize((28, 28), resample=Image.LANCZOS) on the 1-bit PNG as opened;
    PIL resizes mode "1" nearest-neighbour, so the stored images are binary. data_generator.py:117-118 then
    inverts (1 - x / 255)."""
    g = np.random.default_rng(0)
    strokes = g.random((105, 105)) < 0.3                     # True = ink (black in the PNG)
    path = tmp_path / "0101_01.png"
    Image.fromarray(~strokes).convert("1").save(path)        # white paper, black strokes, 1 bit
    assert Image.open(path).mode == "1"
    rows = _pil_nearest_indices(105, 28)
    expected = np.where(strokes[np.ix_(rows, rows)], 255, 0).astype(np.uint8)
    got = decode(str(path), 28, "reference")
    assert set(np.unique(got)) <= {0, 255}
    np.testing.assert_array_equal(got, expected)
    smooth = decode(str(path), 28, "lanczos")
    assert len(np.unique(smooth)) > 2, "the lanczos knob anti-aliases"


def test_paper_omniglot_data_uses_reference_pixels():
    assert PAPER.data.omniglot.resample == "reference" and PAPER.data.omniglot.image_size == 28


def test_meta_gradient_clipped_by_value():
    """maml.py:147-148: gvs = [(tf.clip_by_value(grad, -10, 10), var) ...] on mini-ImageNet."""
    model = torch.nn.Linear(3, 2).double()

    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            out = type("Out", (), {})()
            out.loss = 1e4 * self.model(x).pow(2).sum()
            return out
    learner = Big()
    x = torch.ones(4, 3, dtype=torch.float64)
    opt = torch.optim.SGD(learner.parameters(), lr=0.0)
    out = learner(x)
    out.loss.backward()
    raw = model.weight.grad.clone()
    assert raw.abs().max() > 10
    meta_update(learner, opt, (x,), None, grad_clip_value=10.0)
    np.testing.assert_allclose(model.weight.grad.numpy(), np.clip(raw.numpy(), -10, 10))


def test_ci_is_the_references_formula():
    """main.py:199-201: ci95 = 1.96 * np.std(accs) / sqrt(NUM_TEST_POINTS), np.std with ddof 0."""
    values = [0.2, 1.0, 0.6, 0.8, 0.8]
    mean = sum(values) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 5)
    assert mean_ci95(values) == pytest.approx((mean, 1.96 * std / math.sqrt(5)), rel=1e-12)


def test_paper_sinusoid_is_the_readme_command_and_the_baseline_trains_on_k_points():
    """main.py:4,7-8 and 238: K = 10 support and 10 query points, meta-batch 25, 70,000 iterations; the
    baseline's pretrain_op fits inputa, the K support points of 25 tasks (maml.py:142, main.py:101-107)."""
    s = PAPER.sinusoid
    assert (s.train.k_shot, s.train.k_query, s.train.meta_batch_size, s.train.iterations) == (10, 10, 25, 70000)
    assert (s.pretrain.k, s.pretrain.batch_tasks, s.pretrain.iterations) == (10, 25, 70000)
    assert s.evaluate.n_query is None and s.evaluate.n_tasks == 600 and max(s.evaluate.inner_steps) == 10
    assert s.init == "reference" and s.hidden == [40, 40]


def test_sinusoid_reference_init_is_a_truncated_normal_of_std_0_01():
    """maml.py:170-176: tf.truncated_normal(stddev=0.01) (redrawn beyond 2 std), biases tf.zeros."""
    from mamlbench.models.mlp import MLP
    torch.manual_seed(0)
    net = MLP(1, [40, 40], 1, init="reference")
    weights = torch.cat([m.weight.flatten() for m in net.net if isinstance(m, torch.nn.Linear)]).double()
    assert weights.abs().max() <= 0.02
    truncated_std = 0.01 * math.sqrt(1 - 2 * 2 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2)))
    assert abs(weights.std().item() - truncated_std) < 0.1 * truncated_std
    assert all(bool((m.bias == 0).all()) for m in net.net if isinstance(m, torch.nn.Linear))


def test_paper_mamlpp_network_has_its_references_batch_norm():
    """MAML++'s MetaBatchNormLayer: eps 1e-5, learnable gamma and beta (meta_neural_network_architectures.py:144,
    experiment_config: learnable_bn_gamma/beta true); the benchmark's shift-only eps-1e-3 norm is MAML's."""
    for benchmark in ("omniglot", "mini_imagenet"):
        cell = fewshot_cell(PAPER, benchmark, "mamlpp", "5w1s")
        assert (cell.model, cell.norm, cell.norm_eps, cell.init) == ("vgg_mamlpp", "affine", 1e-5, "reference")
        assert fewshot_cell(PAPER, benchmark, "maml", "5w1s").norm_eps == 1e-3
