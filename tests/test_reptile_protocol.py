"""Reptile as the reference code runs it (openai/supervised-reptile): its minibatch stream, its inner
Adam whose state persists across tasks, its transductive and per-image test predictions, its network.

Every expected value is computed here, in float64, from the reference's formulas: a literal port of
`_mini_batches`, TF's Adam written out, BatchNorm written out in numpy.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mamlbench import runs
from mamlbench.algorithms import build_algorithm
from mamlbench.algorithms.reptile import Reptile
from mamlbench.io import load_torch
from mamlbench.models.conv import build_model
from test_fewshot import make_glyphs, tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # small nets: a second thread only spins on shared cores


# ---- minibatches ---------------------------------------------------------------------------------
def reference_mini_batches(samples, batch_size, num_batches, shuffle):
    """supervised_reptile/reptile.py:223-248 (replacement off), `random.shuffle` passed in."""
    samples = list(samples)
    cur_batch, batch_count = [], 0
    while True:
        shuffle(samples)
        for sample in samples:
            cur_batch.append(sample)
            if len(cur_batch) < batch_size:
                continue
            yield cur_batch
            cur_batch = []
            batch_count += 1
            if batch_count == num_batches:
                return


@pytest.mark.parametrize("n, batch, n_batches", [(5, 3, 7), (4, 4, 3), (5, 7, 4), (6, 2, 5), (50, 10, 5)])
def test_minibatch_indices_are_the_reference_mini_batches(n, batch, n_batches):
    from mamlbench.algorithms.reptile import minibatch_indices
    passes = math.ceil(batch * n_batches / n)
    g = torch.Generator().manual_seed(n * 100 + batch)
    shuffles = torch.stack([torch.randperm(n, generator=g) for _ in range(passes)])
    used = iter(shuffles.tolist())

    def shuffle(lst):  # random.shuffle, with the permutation the test chose
        perm = next(used)
        lst[:] = [lst[i] for i in perm]

    expected = list(reference_mini_batches(range(n), batch, n_batches, shuffle))
    assert next(used, None) is None, "the reference drew as many shuffles as we pass"
    assert minibatch_indices(shuffles, batch, n_batches).tolist() == expected
    # leading (task) dimensions: each task its own stream
    two = torch.stack([shuffles, shuffles.flip(0)])
    assert minibatch_indices(two, batch, n_batches)[0].tolist() == expected


class Recorder:
    """cross-entropy that records the labels of every support batch (labels = example ids)."""

    def __init__(self, batch):
        self.batch, self.seen = batch, []

    def __call__(self, out, y):
        if y.shape[0] == self.batch:
            self.seen.append(y.tolist())
        return F.cross_entropy(out, y)


@pytest.mark.parametrize("batch", [3, 7])
def test_inner_loop_draws_the_reference_stream(batch):
    """Training: the concatenated batches are passes over all n examples, each pass reshuffled, a batch
    straddling two passes when `batch` does not divide n, a batch larger than n spanning passes."""
    n, steps = 5, 12
    record = Recorder(batch)
    torch.manual_seed(0)
    learner = Reptile(nn.Linear(4, n), inner_lr=0.1, inner_steps=steps, strategy="loop", loss_fn=record,
                      inner_batch_size=batch)
    learner.generator = torch.Generator().manual_seed(1)
    sx, sy = torch.randn(1, n, 4), torch.arange(n)[None]
    learner(sx, sy, torch.randn(1, 2, 4), torch.arange(2)[None])
    assert len(record.seen) == steps and all(len(b) == batch for b in record.seen)
    stream = [i for b in record.seen for i in b]
    passes = [stream[i:i + n] for i in range(0, len(stream) - n + 1, n)]
    assert all(sorted(p) == list(range(n)) for p in passes), passes
    assert len({tuple(p) for p in passes}) > 1, "every pass reshuffles the examples"

    # evaluation: eval_inner_batch_size, the same stream (learner.generator unset: a fixed seed)
    record.seen.clear()
    learner = Reptile(nn.Linear(4, n), inner_lr=0.1, strategy="loop", loss_fn=record, eval_inner_batch_size=batch)
    learner.trajectory(sx, sy, sx, sy, inner_steps=steps)
    stream = [i for b in record.seen for i in b]
    assert len(record.seen) == steps and all(sorted(stream[i:i + n]) == list(range(n))
                                             for i in range(0, len(stream) - n + 1, n))


# ---- the inner Adam and its persistent state -----------------------------------------------------
def tf_adam(net, x, y, state, steps, lr, betas):
    """`steps` steps of tf.train.AdamOptimizer on the summed cross-entropy, from `state` (m, v, t)."""
    b1, b2 = betas
    m, v, t = state
    for _ in range(steps):
        net.zero_grad()
        F.cross_entropy(net(x), y, reduction="sum").backward()
        t += 1
        lr_t = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        with torch.no_grad():
            for name, p in net.named_parameters():
                m[name] = b1 * m[name] + (1 - b1) * p.grad
                v[name] = b2 * v[name] + (1 - b2) * p.grad ** 2
                p -= lr_t * m[name] / (v[name].sqrt() + 1e-8)
    return {k: p.detach().clone() for k, p in net.named_parameters()}, (m, v, t)


def small_net(bias: bool = False):
    """No bias before the BatchNorm by default: its gradient is rounding noise, which Adam's division
    by sqrt(v) turns into steps of size lr, different in every implementation."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8, bias=bias), nn.BatchNorm1d(8, eps=1e-3, track_running_stats=False), nn.ReLU(),
                         nn.Linear(8, 3)).double()


def tasks(n_tasks, seed=0, per_class=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tasks, 3 * per_class, 6, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(per_class).expand(n_tasks, -1)
    return x, y


def persistent(model, betas, **kw):
    return build_algorithm("reptile", model, inner_lr=0.01, inner_steps=2, strategy="loop",
                           params=dict(inner_optimizer="adam", persistent_adam=True, adam_betas=list(betas),
                                       inner_loss="sum", final_meta_lr=None, **kw))


@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.5, 0.9)])
def test_adam_state_carries_over_tasks_and_meta_iterations(betas):
    model = small_net()
    learner = persistent(model, betas)
    meta_opt = torch.optim.SGD(learner.parameters(), lr=0.5)
    zeros = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    state = (dict(zeros), dict(zeros), 0)
    for iteration in range(2):
        sx, sy = tasks(2, seed=iteration)
        theta = {k: p.detach().clone() for k, p in model.named_parameters()}
        phis = []
        for t in range(2):  # task 2's first step continues from task 1's moments and step count
            phi, state = tf_adam(copy.deepcopy(model), sx[t], sy[t], state, 2, 0.01, betas)
            phis.append(phi)
        _, fresh = tf_adam(copy.deepcopy(model), sx[1], sy[1], (dict(zeros), dict(zeros), 0), 2, 0.01, betas)
        expected = {k: theta[k] - (phis[0][k] + phis[1][k]) / 2 for k in theta}
        meta_opt.zero_grad()
        learner(sx, sy, sx, sy).loss.backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[k], rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")
        fresh_phi, _ = tf_adam(copy.deepcopy(model), sx[1], sy[1], (dict(zeros), dict(zeros), 0), 2, 0.01, betas)
        gap = max((expected[k] - (theta[k] - (phis[0][k] + fresh_phi[k]) / 2)).abs().max().item() for k in theta)
        assert gap > 1e-5, "a fresh state for task 2 gives another update"
        m, v, step = state
        assert learner.inner_adam_step.item() == step == 4 * (iteration + 1)
        torch.testing.assert_close(learner.inner_adam_m, torch.cat([m[k].flatten() for k in m]), rtol=1e-9, atol=0)
        torch.testing.assert_close(learner.inner_adam_v, torch.cat([v[k].flatten() for k in v]), rtol=1e-9, atol=0)
        meta_opt.step()


def test_evaluation_adapts_each_task_from_a_copy_of_the_state():
    model = small_net()
    learner = persistent(model, (0.0, 0.999), transductive=True)
    learner(*tasks(2), *tasks(2))  # one meta-batch: a state with step count 4
    stored = {k: v.clone() for k, v in learner.state_dict().items()}
    sx, sy = tasks(3, seed=5)
    qx, qy = tasks(3, seed=6, per_class=2)
    losses = learner.trajectory(sx, sy, qx, qy, inner_steps=3)
    for k, v in learner.state_dict().items():
        assert torch.equal(v, stored[k]), f"evaluation changed {k}"

    names = [k for k, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    m = {k: c.view_as(p) for k, p, c in zip(names, model.parameters(), stored["inner_adam_m"].split(sizes))}
    v = {k: c.view_as(p) for k, p, c in zip(names, model.parameters(), stored["inner_adam_v"].split(sizes))}
    for t in range(3):
        net = copy.deepcopy(model)
        state = (dict(m), dict(v), int(stored["inner_adam_step"]))
        expected = [F.cross_entropy(net(qx[t]), qy[t]).item()]
        for _ in range(3):
            _, state = tf_adam(net, sx[t], sy[t], state, 1, 0.01, (0.0, 0.999))
            expected.append(F.cross_entropy(net(qx[t]), qy[t]).item())
        np.testing.assert_allclose(losses[t].numpy(), expected, rtol=1e-9)
    learner.strategy = "vmap"  # tasks independent at test time: batched gives the same
    torch.testing.assert_close(learner.trajectory(sx, sy, qx, qy, inner_steps=3), losses, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("adapt_norm", [True, False])
def test_inner_adam_adapts_batchnorm_as_asked(adapt_norm):
    """The reference's inner Adam minimises over every trainable variable, BatchNorm's scale and shift
    included (adapt_norm true); false leaves them to the meta-update, their Adam moments untouched."""
    model = small_net()
    learner = build_algorithm("reptile", model, inner_lr=0.01, inner_steps=2, strategy="loop", adapt_norm=adapt_norm,
                              params=dict(inner_optimizer="adam", persistent_adam=True))
    sx, sy = tasks(1)
    learner(sx, sy, sx, sy).loss.backward()  # .grad = theta - phi
    names = [k for k, _ in model.named_parameters()]
    m = dict(zip(names, learner.inner_adam_m.split([p.numel() for p in model.parameters()])))
    for name, p in model.named_parameters():
        moved = name not in ("1.weight", "1.bias") or adapt_norm
        assert bool((p.grad != 0).any()) == moved and bool((m[name] != 0).any()) == moved, name


# ---- transductive or not -------------------------------------------------------------------------
def numpy_forward(w, x):
    """Linear -> BatchNorm (batch statistics, biased variance, eps 1e-3) -> ReLU -> Linear, on one batch."""
    h = x @ w["0.weight"].T + w["0.bias"]
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-3) * w["1.weight"] + w["1.bias"]
    return np.maximum(h, 0) @ w["3.weight"].T + w["3.bias"]


def test_transductive_and_per_image_predictions_by_hand():
    model = small_net(bias=True)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    w = {k: p.detach().numpy() for k, p in model.named_parameters()}
    sx, sy = tasks(1, seed=1, per_class=2)
    qx, qy = tasks(1, seed=2, per_class=3)            # labels 0,0,0,1,1,1,2,2,2
    s, q = sx[0].numpy(), qx[0].numpy()
    expected = {
        ("query_set", True): numpy_forward(w, q),
        ("one_per_class", True): np.concatenate([numpy_forward(w, q[[j, 3 + j, 6 + j]]) for j in range(3)])[
            [0, 3, 6, 1, 4, 7, 2, 5, 8]],              # group j: the j-th image of each class
        ("query_set", False): np.stack([numpy_forward(w, np.concatenate([s, q[i:i + 1]]))[-1] for i in range(9)]),
    }
    assert not np.allclose(expected["query_set", True], expected["one_per_class", True])
    assert not np.allclose(expected["query_set", True], expected["query_set", False])
    for (batch, transductive), logits in expected.items():
        for strategy in ("loop", "vmap"):
            learner = build_algorithm("reptile", copy.deepcopy(model), inner_lr=0.1, inner_steps=1, strategy=strategy,
                                      params=dict(transductive=transductive, transductive_batch=batch))
            out = learner.trajectory(sx, sy, qx, qy, inner_steps=0, metric=lambda o, y: o)
            np.testing.assert_allclose(out[0, 0].numpy(), logits, rtol=1e-10, atol=1e-12,
                                       err_msg=f"{batch} transductive={transductive} {strategy}")


# ---- resume ----------------------------------------------------------------------------------------
def test_resume_is_bit_exact_with_the_adam_state(tmp_path):
    glyphs = make_glyphs(tmp_path / "glyphs")
    params_path = tiny(tmp_path)
    raw = yaml.safe_load(params_path.read_text())
    raw["variants"]["reptile"] = {  # the whole section: the repo's holds the paper's budget
        "train": dict(inner_lr=0.01, inner_steps=3, meta_batch_size=2, strategy="vmap"),
        "options": dict(inner_optimizer="adam", persistent_adam=True, inner_batch_size=3, eval_inner_batch_size=2,
                        inner_loss="sum", transductive_batch="one_per_class"),
        "omniglot": {"model": "conv4_reptile_omniglot"}}
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    data = dict(prepared=glyphs / "prepared", episodes_dir=glyphs / "episodes")
    runs.train_fewshot(params_path, "omniglot", "reptile", "5w1s", tmp_path / "a", progress=False, **data)
    runs.train_fewshot(params_path, "omniglot", "reptile", "5w1s", tmp_path / "b", progress=False, **data)
    for name in ("checkpoints/ckpt-00000012.pt", "model.pt", "train.json", "curve.csv"):
        (tmp_path / "b" / name).unlink()
    at6 = load_torch(tmp_path / "b" / "checkpoints" / "ckpt-00000006.pt")["learner"]
    assert at6["inner_adam_step"].item() == 6 * 2 * 3 and at6["inner_adam_v"].abs().sum() > 0
    resumed = runs.train_fewshot(params_path, "omniglot", "reptile", "5w1s", tmp_path / "b", progress=False, **data)
    assert resumed["resumed_from"] == 6
    a, b = load_torch(tmp_path / "a" / "model.pt")["learner"], load_torch(tmp_path / "b" / "model.pt")["learner"]
    assert a["inner_adam_step"].item() == 12 * 2 * 3
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "a" / "curve.csv").read_text() == (tmp_path / "b" / "curve.csv").read_text()


# ---- the network -----------------------------------------------------------------------------------
def test_reptile_network_is_the_reference_model():
    from mamlbench.models.conv import SameConv2d
    conv = SameConv2d(1, 2, 3, stride=2).double()
    x = torch.randn(1, 1, 7, 8, dtype=torch.float64)
    # TF 'same', stride 2: 7 rows -> pad 1 top and 1 bottom; 8 columns -> pad 0 left, 1 right
    expected = F.conv2d(F.pad(x, (0, 1, 1, 1)), conv.weight, conv.bias, stride=2)
    torch.testing.assert_close(conv(x), expected)
    assert conv(x).shape[-2:] == (4, 4)

    model = build_model("conv4_reptile_omniglot", 5)
    assert model.head.in_features == 2 * 2 * 64, "the 2x2x64 map is flattened, not averaged"
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 4 and all(m.eps == 1e-3 and m.affine for m in norms)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for layer in [*convs, model.head]:
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
        bound = math.sqrt(6 / (fan_in + fan_out))  # Glorot uniform
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
        assert layer.bias is not None and torch.equal(layer.bias, torch.zeros_like(layer.bias))
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 5)
    mini = build_model("conv4_reptile_miniimagenet", 5)
    assert mini.head.in_features == 6 * 6 * 32, "84 -> 42 -> 21 -> 11 -> 6 under TF 'same' pooling"
    assert mini(torch.randn(2, 3, 84, 84)).shape == (2, 5)
