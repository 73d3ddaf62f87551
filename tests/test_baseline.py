"""The fine-tuning baseline (Chen et al., ICLR 2019; wyharveychen/CloserLookFewShot) against its reference,
the expected values computed here by hand in float64 numpy, never through the code under test:
training is cross-entropy on global labels (methods/baselinetrain.py), the test-time head is the reference's
SGD loop (methods/baselinefinetune.py:33-50), Baseline++'s head is backbone.py's distLinear; and a short
run through the few-shot path.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mamlbench.algorithms import build_algorithm
from mamlbench.algorithms.baseline import Baseline, DistLinear
from mamlbench.data.sampler import EpisodeIndex, EpisodeSampler
from mamlbench.schema import ConfigError


class Tiny(nn.Module):
    """head(features(x)): a flatten and a linear body, so every feature is a line of numpy."""

    def __init__(self, d_in: int, d_feat: int, n_out: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(d_in, d_feat))
        self.head = nn.Linear(d_feat, n_out)
        self.double()

    def forward(self, x):
        return self.head(self.features(x))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(softmax(logits)[np.arange(len(labels)), labels]).mean())


def body(model: Tiny, x: np.ndarray) -> np.ndarray:
    w, b = model.features[1].weight.detach().numpy(), model.features[1].bias.detach().numpy()
    return x.reshape(len(x), -1) @ w.T + b


# ---- 1. training: cross-entropy on the split's classes --------------------------------------------
@pytest.mark.parametrize("rotations_as_classes", [True, False])
def test_training_loss_is_cross_entropy_on_global_labels(rotations_as_classes):
    """baselinetrain.py:15-21,30-33: nn.Linear(feat, num_class) over every base class, mean cross-entropy on
    each image's base-class label. Here a task's images carry their class in the split: class * 4 + rotation
    when rotations make classes (the reference's rot_omniglot.py folders), else the class."""
    g = np.random.default_rng(0)
    images = torch.from_numpy((g.random((6, 4, 1, 4, 4)) * 255).astype(np.uint8))
    n_classes = 24 if rotations_as_classes else 6
    sampler = EpisodeSampler(images, n_way=2, k_shot=1, n_query=1, rotations=(0, 1, 2, 3),
                             rotations_as_classes=rotations_as_classes)
    # one task: class 4 at a half turn, class 1 upright; class 4's images 0 (support) and 1 (query), class 1's 3 and 2
    index = EpisodeIndex(classes=torch.tensor([[4, 1]]), rotations=torch.tensor([[2, 0]]),
                         support=torch.tensor([[[0], [3]]]), query=torch.tensor([[[1], [2]]]))
    batch = sampler.gather(index, global_classes=True)
    expected_labels = [18, 4] if rotations_as_classes else [4, 1]   # 4 * 4 + 2, 1 * 4 + 0
    assert batch.support_y.tolist() == [expected_labels] and batch.query_y.tolist() == [expected_labels]
    assert sampler.gather(index).support_y.tolist() == [[0, 1]]     # the episodic labels are unchanged

    model = Tiny(16, 3, n_classes)
    learner = build_algorithm("baseline", model, inner_lr=0.1, inner_steps=1)
    assert model.head.bias.abs().sum() == 0                          # baselinetrain.py:16
    batch = [t.double() if t.is_floating_point() else t for t in batch]
    loss = learner(*batch).loss

    # by hand: the images (support then query), rotated by numpy, through the linear body and head
    raw = (images.numpy().astype(np.float32) / np.float32(255)).astype(np.float64)   # the sampler's float32 pixels
    x = np.stack([np.rot90(raw[4, 0, 0], 2), raw[1, 3, 0], np.rot90(raw[4, 1, 0], 2), raw[1, 2, 0]])
    logits = body(model, x) @ model.head.weight.detach().numpy().T
    expected = cross_entropy(logits, np.array(expected_labels * 2))
    assert abs(loss.item() - expected) < 1e-12
    # and it is the loss the Adam step differentiates
    loss.backward()
    assert model.head.weight.grad is not None and model.features[1].weight.grad is not None


# ---- 2. test time: a new head fitted by the reference's SGD, the body frozen ----------------------
def numpy_finetune(kind, head, z, y, orders, scale):
    """baselinefinetune.py:33-50 in float64: SGD(lr 0.01, momentum 0.9, dampening 0.9, weight_decay 0.001),
    mean cross-entropy on batches of 4 of each epoch's permutation, 100 epochs, one momentum buffer.
    torch.optim.SGD's rule: d = grad + wd * p; buf = d at the first step, then 0.9 buf + (1 - 0.9) d; p -= lr buf."""
    lr, momentum, dampening, wd, bs = 0.01, 0.9, 0.9, 0.001, 4
    p = {k: v.copy() for k, v in head.items()}
    buf = {}
    for order in orders:
        for i in range(0, len(y), bs):
            pick = order[i:i + bs]
            x, t = z[pick], y[pick]
            onehot = np.eye(len(p.get("bias", p.get("weight_g"))))[t]
            if kind == "linear":
                logits = x @ p["weight"].T + p["bias"]
                g_logits = (softmax(logits) - onehot) / len(t)
                grads = {"weight": g_logits.T @ x, "bias": g_logits.sum(0)}
            else:
                xn = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)
                vn = np.linalg.norm(p["weight_v"], axis=1, keepdims=True)
                u = p["weight_v"] / vn
                logits = scale * xn @ (p["weight_g"] * u).T
                g_w = scale * ((softmax(logits) - onehot) / len(t)).T @ xn          # dL/dw, w = g v / |v|
                g_g = (g_w * u).sum(1, keepdims=True)
                grads = {"weight_g": g_g, "weight_v": p["weight_g"] / vn * (g_w - g_g * u)}
            for k in p:
                d = grads[k] + wd * p[k]
                buf[k] = d.copy() if k not in buf else momentum * buf[k] + (1 - dampening) * d
                p[k] = p[k] - lr * buf[k]
    return p


def numpy_logits(kind, p, x, scale):
    if kind == "linear":
        return x @ p["weight"].T + p["bias"]
    xn = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)
    w = p["weight_g"] * p["weight_v"] / np.linalg.norm(p["weight_v"], axis=1, keepdims=True)
    return scale * xn @ w.T


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_finetuned_head_is_the_reference_sgd_loop_and_the_body_is_frozen(kind):
    n_way, k_shot, n_query, d_feat = 3, 2, 4, 5   # 6 support examples: batches of 4 and 2 each epoch
    model = Tiny(12, d_feat, 10)
    learner = build_algorithm("baseline", model, inner_lr=0.1, inner_steps=1, params={"head": kind})
    g = torch.Generator().manual_seed(3)
    sx = torch.randn(2, n_way * k_shot, 1, 3, 4, generator=g, dtype=torch.float64)
    qx = torch.randn(2, n_way * n_query, 1, 3, 4, generator=g, dtype=torch.float64)
    sy = torch.arange(n_way).repeat_interleave(k_shot).expand(2, -1)
    qy = torch.arange(n_way).repeat_interleave(n_query).expand(2, -1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    learner.eval()
    logits = learner.query_logits(sx, sy, qx)
    acc = learner.trajectory(sx, sy, qx, qy, inner_steps=2, metric=lambda o, y: (o.argmax(-1) == y).double().mean())

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the body (and old head) untouched
    assert all(p.grad is None for p in model.parameters())
    for t in range(2):
        # the episode's own draws (what is random, not what is tested): its initial head and epoch orders
        head, orders = learner.episode_head(n_way, sx[t], sy[t], 100)
        assert orders.shape == (100, n_way * k_shot)
        head = {k: v.numpy() for k, v in head.items()}
        if kind == "linear":   # nn.Linear's default init: U(-1/sqrt(d), 1/sqrt(d)) for both (baselinefinetune.py:28)
            assert set(head) == {"weight", "bias"} and np.abs(head["weight"]).max() <= d_feat ** -0.5
        else:                  # WeightNorm's init: g = |v| per class
            np.testing.assert_allclose(head["weight_g"][:, 0], np.linalg.norm(head["weight_v"], axis=1))
        z = body(model, sx[t].numpy())
        p = numpy_finetune(kind, head, z, sy[t].numpy(), orders.numpy(), scale=2.0)
        expected = numpy_logits(kind, p, body(model, qx[t].numpy()), scale=2.0)
        np.testing.assert_allclose(logits[t].numpy(), expected, rtol=1e-9, atol=1e-11)
        expected_acc = (expected.argmax(1) == qy[t].numpy()).mean()
        assert acc[t].tolist() == [expected_acc] * 3   # the one prediction at every reported "step"
    # reproducible: the same episode gets the same head whatever else is in its chunk
    torch.testing.assert_close(learner.query_logits(sx[1:], sy[1:], qx[1:])[0], logits[1], rtol=0, atol=0)
    # and two episodes get their own draws
    assert not torch.equal(learner.episode_head(n_way, sx[0], sy[0], 5)[1], learner.episode_head(n_way, sx[1], sy[1], 5)[1])


# ---- 3. Baseline++'s head --------------------------------------------------------------------------
def test_cosine_head_is_scaled_cosine_similarity_with_class_wise_norms():
    """backbone.py distLinear: scale * L(x / (|x| + 1e-5)) with L under WeightNorm(dim=0), so logit k is
    scale * g_k * cos(x, v_k) * |x| / (|x| + 1e-5); scale 2 for <= 200 classes, 10 above (backbone.py:30-33)."""
    torch.manual_seed(0)
    head = DistLinear(6, 4).double()
    assert head.scale_factor == 2 and DistLinear(6, 201).scale_factor == 10 and DistLinear(6, 200).scale_factor == 2
    assert DistLinear(6, 4, scale_factor=4).scale_factor == 4
    with torch.no_grad():
        head.weight_g.copy_(torch.tensor([[1.0], [0.5], [2.0], [3.0]], dtype=torch.float64))
    x = torch.randn(5, 6, dtype=torch.float64)
    xs, v, gk = x.numpy(), head.weight_v.detach().numpy(), np.array([1.0, 0.5, 2.0, 3.0])
    nx, nv = np.linalg.norm(xs, axis=1), np.linalg.norm(v, axis=1)
    cos = (xs @ v.T) / nx[:, None] / nv[None]
    expected = 2 * gk[None] * cos * (nx / (nx + 1e-5))[:, None]
    np.testing.assert_allclose(head(x).detach().numpy(), expected, rtol=1e-12, atol=1e-14)
    with torch.no_grad():   # with unit norms it is scale x the cosine similarity to w
        head.weight_g.fill_(1.0)
    np.testing.assert_allclose(head(x).detach().numpy(), 2 * cos * (nx / (nx + 1e-5))[:, None], rtol=1e-12)
    # the learner builds it as the training head, of the training classes' size
    model = Tiny(12, 6, 300)
    learner = build_algorithm("baseline", model, inner_lr=0.1, inner_steps=1, params={"head": "cosine"})
    assert isinstance(learner.model.head, DistLinear) and learner.model.head.weight_v.shape == (300, 6)
    assert learner.model.head.scale_factor == 10


def test_training_lowers_the_supervised_loss_on_the_global_classes():
    """Adam on minibatches of episodes drawn from 6 fixed classes, labelled by class: the loss of a held-out
    minibatch falls (the generic `test_meta_loss_falls` has no global classes to learn)."""
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(6, 8, generator=g)

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        classes = torch.rand(4, 6, generator=g).topk(3, dim=1).indices           # 4 tasks of 3 classes
        ys, yq = classes.repeat_interleave(2, 1), classes.repeat_interleave(3, 1)
        return (protos[ys] + 0.3 * torch.randn(4, 6, 8, generator=g), ys,
                protos[yq] + 0.3 * torch.randn(4, 9, 8, generator=g), yq)

    learner = build_algorithm("baseline", Tiny(8, 16, 6).float(), inner_lr=0.1, inner_steps=1)
    opt = torch.optim.Adam(learner.parameters(), lr=0.01)
    held_out = batch(999)
    before = learner(*held_out).loss.item()
    for i in range(25):
        out = learner(*batch(i))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert learner(*held_out).loss.item() < 0.7 * before


def test_paper_profile_resolves_to_the_reference_protocol():
    """docs/protocols.md, "Baseline and Baseline++": values typed from CloserLookFewShot, not read from the code."""
    from conftest import ROOT
    from mamlbench.config import fewshot_cell, load_params
    paper = load_params(ROOT / "params.yaml", profile="paper")
    for benchmark, iterations, num_classes in (("omniglot", 25700, None), ("mini_imagenet", 960000, 200)):
        cell = fewshot_cell(paper, benchmark, "baseline", "5w1s")
        assert (cell.train.meta_lr, cell.train.loss_reduction, cell.train.iterations) == (1e-3, "mean", iterations)
        assert (cell.train.meta_batch_size, cell.train.k_shot, cell.train.n_query) == (1, 1, 2)   # 5 x 3 images
        assert (cell.evaluate.inner_steps, cell.evaluate.checkpoint) == (0, "final")
        o = cell.options
        assert (o.head, o.num_classes, o.scale_factor) == ("linear", num_classes, None)
        assert (o.finetune_lr, o.finetune_momentum, o.finetune_dampening, o.finetune_weight_decay) == (0.01, 0.9, 0.9, 1e-3)
        assert (o.finetune_batch_size, o.finetune_epochs) == (4, 100)
        assert (cell.model, cell.norm, cell.init) == (fewshot_cell(paper, benchmark, "maml", "5w1s").model,) + (
            getattr(paper, benchmark).norm, getattr(paper, benchmark).init)   # the benchmark's network, as MAML's


def test_num_classes_widens_the_training_head():
    learner = build_algorithm("baseline", Tiny(4, 2, 3), inner_lr=0.1, inner_steps=1, params={"num_classes": 7})
    assert learner.model.head.weight.shape == (7, 2)
    with pytest.raises(ValueError, match="fewer than the 3 training classes"):
        build_algorithm("baseline", Tiny(4, 2, 3), inner_lr=0.1, inner_steps=1, params={"num_classes": 2})


def test_options_are_validated():
    with pytest.raises(ConfigError, match="baseline.head"):
        build_algorithm("baseline", Tiny(4, 2, 3), inner_lr=0.1, inner_steps=1, params={"head": "dist"})
    with pytest.raises(ConfigError, match="baseline.finetune_lr"):
        build_algorithm("baseline", Tiny(4, 2, 3), inner_lr=0.1, inner_steps=1, params={"finetune_lr": 0})
    with pytest.raises(ValueError, match="head"):
        Baseline(nn.Linear(4, 3))


# ---- 4. through the few-shot path -------------------------------------------------------------------
@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    from test_fewshot import make_glyphs
    return make_glyphs(tmp_path_factory.mktemp("glyphs"))


@pytest.mark.parametrize("head", ["linear", "cosine"])   # ~4 s each on two CPU cores
def test_baseline_trains_and_evaluates_through_the_fewshot_path(tmp_path, glyphs, head, monkeypatch):
    """`mamlbench train omniglot -a baseline`, then evaluate: trained on the split's class labels, the head has
    one output per training class (20 glyph classes, rotations not classes in the maml scheme), and the
    metrics have every variant's shape."""
    seen = []
    forward = Baseline.forward

    def recording(self, support_x, support_y, query_x, query_y):
        if torch.is_grad_enabled():   # the training steps (validation goes through trajectory)
            seen.append(torch.cat([support_y.flatten(), query_y.flatten()]))
        return forward(self, support_x, support_y, query_x, query_y)
    monkeypatch.setattr(Baseline, "forward", recording)
    from conftest import write_params
    from mamlbench import runs
    from mamlbench.io import load_torch
    params_path = write_params(tmp_path / "params.yaml", {
        "profile": "t", "profiles": {"t": {}}, "tracking": {"enabled": False},
        "omniglot": {"hidden": 16, "settings": {"5w1s": {"n_way": 5, "k_shot": 1, "n_query": 5}},
                     "train": {"iterations": 4, "validate_every": 2, "n_val_episodes": 8, "checkpoint_every": 2,
                               "log_every": 1},
                     "evaluate": {"inner_steps": 2, "n_episodes": 16, "chunk": 8}},
        "variants": {"baseline": {"options": {"head": head}, "omniglot": {"train": {"iterations": 4}}}},
    })
    data = dict(prepared=glyphs / "prepared", episodes_dir=glyphs / "episodes")
    out = runs.train_fewshot(params_path, "omniglot", "baseline", "5w1s", tmp_path / "a", progress=False, **data)
    assert out["iterations"] == 4 and 0 <= out["meta_val/best_acc"] <= 1 and np.isfinite(out["meta_train/query_loss"])
    labels = torch.cat(seen)
    assert len(seen) == 4 and labels.max() >= 5 and labels.max() < 20   # global labels, not 0..4
    state = load_torch(tmp_path / "a" / "model.pt")["learner"]
    key = "model.head.weight" if head == "linear" else "model.head.weight_v"
    assert state[key].shape == (20, 16)
    metrics = runs.evaluate_fewshot(params_path, "omniglot", "baseline", "5w1s", tmp_path / "a", tmp_path / "eval",
                                    **data)
    assert metrics["n_episodes"] == 16 and set(metrics["per_step"]) == {"step0"} and metrics["inner_steps"] == 0
    assert 0 <= metrics["acc"] <= 1
    assert (tmp_path / "eval" / "steps.csv").read_text().splitlines()[0] == "inner_steps,acc,ci95"
    assert len((tmp_path / "eval" / "per_episode.csv").read_text().splitlines()) == 17
    again = runs.evaluate_fewshot(params_path, "omniglot", "baseline", "5w1s", tmp_path / "a", tmp_path / "eval2",
                                  **data)
    assert again["acc"] == metrics["acc"]   # the fine-tuning is seeded by the episodes: reproducible
