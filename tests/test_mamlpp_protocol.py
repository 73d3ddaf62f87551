"""MAML++ against its reference protocol (github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch).

Expected values are computed here from the reference's formulas, in float64, never from the code
under test: the cosine schedule of `CosineAnnealingLR(T_max=total_epochs)` stepped with the epoch
index, the MSL importance vector of `get_per_step_loss_importance_vector`, the VGG network's shape
and init, and the top-k ensemble's accuracy on hand-made logits.
"""
from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT, write_params
from mamlbench import runs
from mamlbench.algorithms.maml import MAML
from mamlbench.algorithms.mamlpp import MAMLPlusPlus, PerStepBatchNorm
from mamlbench.config import fewshot_cell, load_params
from mamlbench.ensemble import Ensemble, keep_top_k, load_top_k, read_top_k
from mamlbench.fewshot import accuracy
from mamlbench.io import load_torch, save_torch
from mamlbench.models.conv import MODELS, build_model

N_WAY = 3


def episodes(n_tasks: int, side: int = 16, k_shot: int = 2, k_query: int = 3, seed: int = 0):
    """(support_x, support_y, query_x, query_y) of image tasks: class prototypes plus noise, float64."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(n_tasks, N_WAY, 1, side, side, generator=g, dtype=torch.float64)

    def draw(k):
        y = torch.arange(N_WAY).repeat(k).expand(n_tasks, -1)
        x = protos[torch.arange(n_tasks)[:, None], y]
        return x + 0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64), y
    return (*draw(k_shot), *draw(k_query))


def learner(inner_steps: int = 2, **options) -> MAMLPlusPlus:
    torch.manual_seed(0)
    model = build_model("vgg_mamlpp", N_WAY, in_channels=1, image_size=16, hidden=4).double()
    return MAMLPlusPlus(model, inner_lr=0.3, inner_steps=inner_steps, strategy="loop", **options).double()


def meta_train(learner: MAMLPlusPlus, updates: int = 3) -> None:
    opt = torch.optim.Adam(learner.parameters(), lr=0.01)
    for i in range(updates):
        learner.set_iteration(i)
        out = learner(*episodes(2, seed=10 + i))
        opt.zero_grad()
        out.loss.backward()
        opt.step()


@functools.lru_cache(maxsize=None)
def _trained(eval_running_stats: bool) -> MAMLPlusPlus:
    lrn = learner(eval_running_stats=eval_running_stats)
    meta_train(lrn)
    return lrn


def trained(eval_running_stats: bool) -> MAMLPlusPlus:
    """A learner after 3 meta-updates (its running statistics written), fresh for each test."""
    return copy.deepcopy(_trained(eval_running_stats))


def norms(learner: MAMLPlusPlus) -> list[PerStepBatchNorm]:
    return [m for m in learner.model.modules() if isinstance(m, PerStepBatchNorm)]


def running_stats(learner: MAMLPlusPlus) -> list[torch.Tensor]:
    return [t.clone() for n in norms(learner) for t in (n.running_mean, n.running_var)]


# ---- BatchNorm running statistics at evaluation -----------------------------------------------------
@pytest.mark.parametrize("eval_running_stats", [True, False])
def test_evaluation_reads_the_running_stats_only_when_told(eval_running_stats):
    """true (the paper's text): shifting the per-step statistics moves every adapted query loss;
    false (the reference code): they are never read, so the result is bit-identical."""
    lrn = trained(eval_running_stats)  # in training mode, as fewshot's validation finds it
    assert lrn.training and all(n.running_mean.abs().sum() > 0 for n in norms(lrn))
    batch = episodes(4, seed=99)
    before = lrn.trajectory(*batch, inner_steps=2)
    with torch.no_grad():
        for n in norms(lrn):
            n.running_mean += 0.5
            n.running_var *= 3.0
    after = lrn.trajectory(*batch, inner_steps=2)
    if eval_running_stats:
        assert (before - after).abs().min() > 1e-6, "every task and step must feel the statistics"
    else:
        assert torch.equal(before, after)
    assert lrn.training, "evaluation hands the learner back in the mode it found it"


@pytest.mark.parametrize("eval_running_stats", [True, False])
def test_evaluation_never_writes_the_running_stats(eval_running_stats):
    lrn = trained(eval_running_stats)
    stats = running_stats(lrn)
    lrn.trajectory(*episodes(4, seed=99), inner_steps=2)  # what validation and test run
    for old, new in zip(stats, running_stats(lrn)):
        assert torch.equal(old, new)
    meta_train(lrn, updates=1)                            # while meta-training does write them
    assert any(not torch.equal(old, new) for old, new in zip(stats, running_stats(lrn)))


def test_unread_statistics_do_not_force_the_loop():
    model = build_model("vgg_mamlpp", N_WAY, in_channels=1, image_size=16, hidden=4)
    reference = MAMLPlusPlus(model, inner_lr=0.3, inner_steps=2, eval_running_stats=False)
    assert reference.resolve_strategy(torch.device("cuda")) == "vmap"
    read = MAMLPlusPlus(build_model("vgg_mamlpp", N_WAY, in_channels=1, image_size=16, hidden=4),
                        inner_lr=0.3, inner_steps=2, eval_running_stats=True)
    assert read.resolve_strategy(torch.device("cuda")) == "loop"


def test_query_pass_uses_the_slot_of_the_step_before_as_the_reference():
    """Reference (few_shot_learning_system.py L215-243): the support pass of theta_s and the query pass
    of theta_s+1 both run with `num_step = s`; S slots. "state": S+1 slots, slot s for theta_s."""
    batch = episodes(2, seed=5)

    def shifted_trajectory(mode: str, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        lrn = learner(per_step_slots=mode)
        base = lrn.trajectory(*batch, inner_steps=2)
        with torch.no_grad():
            for n in norms(lrn):
                n.weight[slot] += 0.7
        return base, lrn.trajectory(*batch, inner_steps=2)

    assert norms(learner(per_step_slots="reference"))[0].weight.shape == (2, 4)
    assert norms(learner(per_step_slots="state"))[0].weight.shape == (3, 4)
    base, moved = shifted_trajectory("reference", 1)     # slot 1: support of theta_1, query of theta_2
    assert torch.equal(base[:, :2], moved[:, :2]) and (base[:, 2] != moved[:, 2]).all()
    base, moved = shifted_trajectory("reference", 0)     # slot 0: theta_0 everywhere, query of theta_1
    assert (base[:, 1] != moved[:, 1]).all()
    base, moved = shifted_trajectory("state", 1)         # state: slot 1 is theta_1's, query included
    assert torch.equal(base[:, 0], moved[:, 0]) and (base[:, 1] != moved[:, 1]).all()


# ---- schedules per epoch --------------------------------------------------------------------------
def reference_lr(iteration: int, iterations_per_epoch: int, total_epochs: int, base: float, eta_min: float) -> float:
    """CosineAnnealingLR's closed form at `last_epoch = int(iteration / iterations_per_epoch)`."""
    epoch = int(iteration / iterations_per_epoch)
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * epoch / total_epochs)) / 2


def reference_msl(n_steps: int, epoch: int, msl_epochs: int) -> np.ndarray:
    """get_per_step_loss_importance_vector, rewritten in float64."""
    weights = np.full(n_steps, 1.0 / n_steps)
    decay = 1.0 / n_steps / msl_epochs
    floor = 0.03 / n_steps
    weights[:-1] = np.maximum(weights[:-1] - epoch * decay, floor)
    weights[-1] = min(1.0 / n_steps + epoch * (n_steps - 1) * decay, 1.0 - (n_steps - 1) * floor)
    return weights


@pytest.mark.parametrize("base, eta_min", [(1e-3, 1e-5), (2e-3, 1e-4)])  # Omniglot; mini-ImageNet is flat (1e-3, 1e-3)
def test_cosine_annealing_moves_per_epoch_as_the_reference(base, eta_min):
    lrn = learner(iterations_per_epoch=500, min_meta_lr=eta_min)
    for i in (0, 1, 499, 500, 501, 12345, 24999, 25000, 49999):
        assert lrn.meta_lr(i, 50000, base) == pytest.approx(reference_lr(i, 500, 100, base, eta_min), rel=1e-12)
    assert lrn.meta_lr(499, 50000, base) == lrn.meta_lr(0, 50000, base)
    # iterations_per_epoch 1: the cosine of every meta-update
    stepwise = learner(iterations_per_epoch=1, min_meta_lr=1e-5)
    assert stepwise.meta_lr(499, 50000, 1e-3) == pytest.approx(reference_lr(499, 1, 50000, 1e-3, 1e-5), rel=1e-12)


def test_multi_step_loss_and_derivative_order_move_per_epoch():
    lrn = learner(inner_steps=5, iterations_per_epoch=500, multi_step_loss_iterations=10 * 500,
                  derivative_order_annealing=True, first_order_iterations=(3 + 1) * 500)  # reference f = 3
    for i in (0, 499, 500, 2750, 4999):
        lrn.set_iteration(i)
        np.testing.assert_allclose(lrn.step_weights(), reference_msl(5, i // 500, 10), rtol=1e-12)
    for i in (5000, 7000):  # the reference's epoch >= multi_step_loss_num_epochs: the last step only
        lrn.set_iteration(i)
        assert lrn.step_weights() is None
    for i, first in ((0, True), (1999, True), (2000, False), (2001, False)):  # second order once epoch > f
        lrn.set_iteration(i)
        assert lrn.first_order is first


# ---- the network ----------------------------------------------------------------------------------
@pytest.mark.parametrize("channels, side, hidden, features", [(1, 28, 64, 64), (3, 84, 48, 48 * 5 * 5)])
def test_vgg_mamlpp_shape_and_init(channels, side, hidden, features):
    """VGGReLUNormNetwork with max_pooling: 28 -> 14 -> 7 -> 3 -> 1 and 84 -> 42 -> 21 -> 10 -> 5."""
    torch.manual_seed(0)
    model = build_model("vgg_mamlpp", 5, in_channels=channels, image_size=side, hidden=hidden)
    assert "vgg_mamlpp" in MODELS
    x = torch.randn(7, channels, side, side)
    assert model.features(x).shape == (7, features) and model(x).shape == (7, 5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    acts = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == len(bns) == len(acts) == len(pools) == 4
    assert all(a.negative_slope == 0.01 for a in acts) and all(p.kernel_size == 2 for p in pools)
    for conv in convs:
        assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        assert conv.bias is not None and torch.equal(conv.bias, torch.zeros_like(conv.bias))
    for bn in bns:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert torch.equal(model.head.bias, torch.zeros(5)) and model.head.in_features == features
    for layer in [*convs, model.head]:  # xavier uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out))
        w = layer.weight.detach().double()
        receptive = w[0, 0].numel() if w.dim() == 4 else 1
        bound = math.sqrt(6.0 / (w.shape[1] * receptive + w.shape[0] * receptive))
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


# ---- the top-k ensemble -----------------------------------------------------------------------------
def linear_member(weight, bias) -> MAML:
    """A 2-feature, 2-way linear classifier with hand-set weights inside MAML (inner_lr 0.5)."""
    head = nn.Linear(2, 2).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weight, dtype=torch.float64))
        head.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return MAML(head, inner_lr=0.5, inner_steps=1, strategy="loop")


# One task: support = the query here; three queries, labels 0, 1, 1.
QX = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
QY = torch.tensor([[0, 1, 1]])
MEMBERS = [([[3, 0], [0, 1]], [0, 0]),      # logits [3,0] [0,1] [3,1]: right, right, wrong -> 2/3
           ([[0, 0], [-2, 10]], [0, 0]),    # [0,-2] [0,10] [0,8]: all right -> 1
           ([[1, 0], [0, 0]], [0, 0.5])]    # [1,.5] [0,.5] [1,.5]: right, right, wrong -> 2/3


def test_ensemble_averages_logits_not_votes_nor_accuracies():
    """Query 3: members say 0, 1, 0 (a vote: wrong); mean logits [4/3, 19/6] say 1 (right).
    Mean logits: 3/3 right; a majority vote 2/3; the mean of the members' accuracies 7/9."""
    ensemble = Ensemble([linear_member(*m) for m in MEMBERS])
    acc = ensemble.trajectory(QX, QY, QX, QY, inner_steps=0, metric=accuracy)
    assert acc.shape == (1, 1) and acc.item() == 1.0
    singles = [linear_member(*m).trajectory(QX, QY, QX, QY, inner_steps=0, metric=accuracy).item() for m in MEMBERS]
    assert singles == pytest.approx([2 / 3, 1.0, 2 / 3])


def test_ensemble_members_adapt_on_their_own():
    """After one inner SGD step each member has its own theta_1: W - 0.5 (softmax(XW'+b) - Y)' X / n."""
    x, y = QX[0], torch.nn.functional.one_hot(QY[0], 2).double()
    logits = []
    for weight, bias in MEMBERS:
        w, b = torch.tensor(weight, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)
        err = (torch.softmax(x @ w.T + b, -1) - y) / 3
        w1, b1 = w - 0.5 * err.T @ x, b - 0.5 * err.sum(0)
        logits.append(x @ w1.T + b1)
    mean = torch.stack(logits).mean(0)
    expected_loss = torch.nn.functional.cross_entropy(mean, QY[0])
    ensemble = Ensemble([linear_member(*m) for m in MEMBERS])
    got = ensemble.trajectory(QX, QY, QX, QY, inner_steps=1)  # default metric: the members' loss_fn
    torch.testing.assert_close(got[0, 1], expected_loss, rtol=1e-12, atol=1e-12)


def test_keep_top_k_keeps_the_k_best_validations(tmp_path):
    for iteration, acc in [(100, 0.5), (200, 0.7), (300, 0.6), (400, 0.8), (500, 0.55), (600, 0.7)]:
        keep_top_k(tmp_path, 3, acc, iteration, lambda: {"iteration": iteration})
    assert [(e["iteration"], e["acc"]) for e in read_top_k(tmp_path)] == [(400, 0.8), (200, 0.7), (600, 0.7)]
    assert sorted(p.name for p in (tmp_path / "topk").glob("*.pt")) == [
        "iter-00000200.pt", "iter-00000400.pt", "iter-00000600.pt"]
    assert [s["iteration"] for s in load_top_k(tmp_path, 2)] == [400, 200]
    with pytest.raises(ValueError, match="3 checkpoint"):
        load_top_k(tmp_path, 5)
    # a resumed run validates 600 again: its old entry goes first, the new one takes the free place
    assert keep_top_k(tmp_path, 3, 0.1, 600, lambda: {"iteration": 600, "again": True})
    assert [(e["iteration"], e["acc"]) for e in read_top_k(tmp_path)] == [(400, 0.8), (200, 0.7), (600, 0.1)]
    assert load_top_k(tmp_path, 3)[2]["again"]
    assert not keep_top_k(tmp_path, 3, 0.05, 700, lambda: {"iteration": 700})
    assert not (tmp_path / "topk" / "iter-00000700.pt").exists()


def test_float32_noise_in_a_tied_validation_keeps_the_earlier_checkpoint(tmp_path):
    # the same 0.6, one float32 ulp above: what a different summation order of the episodes gives
    later = torch.nextafter(torch.tensor(0.6), torch.tensor(1.0)).item()
    assert later > 0.6
    keep_top_k(tmp_path, 1, 0.6, 100, lambda: {"iteration": 100})
    assert not keep_top_k(tmp_path, 1, later, 200, lambda: {"iteration": 200})
    assert [e["iteration"] for e in read_top_k(tmp_path)] == [100]


# ---- profile paper: the reference's experiment configs ----------------------------------------------
# experiment_config/omniglot_maml++-omniglot_*.json and mini-imagenet_maml++-mini-imagenet_*.json
REFERENCE = {
    "omniglot": dict(batch_size=8, cnn_num_filters=64, init_inner_loop_learning_rate=0.1, num_target_samples=1,
                     multi_step_loss_num_epochs=10, min_learning_rate=1e-5, clamp=None),
    "mini_imagenet": dict(batch_size=2, cnn_num_filters=48, init_inner_loop_learning_rate=0.01, num_target_samples=15,
                          multi_step_loss_num_epochs=15, min_learning_rate=1e-3, clamp=10.0),
}
SHARED = dict(number_of_training_steps_per_iter=5, number_of_evaluation_steps_per_iter=5, total_epochs=100,
              total_iter_per_epoch=500, meta_learning_rate=1e-3, first_order_to_second_order_epoch=-1, top_n_models=5)


@pytest.mark.parametrize("benchmark", ["omniglot", "mini_imagenet"])
def test_paper_profile_is_the_reference_protocol(benchmark):
    ref, params = {**REFERENCE[benchmark], **SHARED}, load_params(ROOT / "params.yaml", profile="paper")
    for setting in getattr(params, benchmark).settings:
        cell = fewshot_cell(params, benchmark, "mamlpp", setting)
        train, ev, opt = cell.train, cell.evaluate, cell.options
        assert ev.inner_steps == train.inner_steps == ref["number_of_evaluation_steps_per_iter"] == 5, setting
        assert cell.model == "vgg_mamlpp"
        network = build_model(cell.model, 5, hidden=cell.hidden)
        assert network.features[0].out_channels == ref["cnn_num_filters"]
        assert (train.meta_batch_size, train.n_query) == (ref["batch_size"], ref["num_target_samples"])
        assert train.inner_lr == ref["init_inner_loop_learning_rate"] and train.loss_reduction == "mean"
        assert train.meta_lr == ref["meta_learning_rate"] and train.grad_clip_value == ref["clamp"]
        assert train.grad_clip is None and train.adapt_norm is False
        assert train.iterations == ref["total_epochs"] * ref["total_iter_per_epoch"]
        assert train.validate_every == opt.iterations_per_epoch == ref["total_iter_per_epoch"]
        assert opt.multi_step_loss_iterations == ref["multi_step_loss_num_epochs"] * ref["total_iter_per_epoch"]
        assert opt.min_meta_lr == ref["min_learning_rate"]
        assert not opt.derivative_order_annealing or opt.first_order_iterations == (
            ref["first_order_to_second_order_epoch"] + 1) * ref["total_iter_per_epoch"]
        assert opt.eval_running_stats is False and opt.per_step_slots == "reference"
        assert opt.multi_step_loss and opt.per_step_bn_stats and opt.per_step_bn_weights and opt.lslr
        assert opt.cosine_annealing
        assert ev.ensemble == ref["top_n_models"]


# ---- end to end: training keeps the top k, evaluation reads what the knobs say -----------------------
@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    from test_fewshot import make_glyphs
    return make_glyphs(tmp_path_factory.mktemp("glyphs"))


def cell_params(tmp_path, ensemble: int = 3, **options):
    return write_params(tmp_path / "params.yaml", {
        "profile": "t", "profiles": {"t": {}}, "tracking": {"enabled": False},
        "omniglot": {"settings": {"5w1s": {"n_way": 5, "k_shot": 1, "n_query": 5}},
                     "train": {"iterations": 12, "meta_batch_size": 2, "n_query": 5, "validate_every": 3,
                               "n_val_episodes": 20, "checkpoint_every": 6, "log_every": 3},
                     "evaluate": {"n_episodes": 20, "chunk": 20}},
        "variants": {"mamlpp": {"train": {"inner_lr": 0.4, "inner_steps": 2, "iterations": 12, "validate_every": 3,
                                          "n_val_episodes": 10, "meta_batch_size": 2},
                                "evaluate": {"inner_steps": 2, "ensemble": ensemble, "checkpoint": "final"},
                                "options": {"iterations_per_epoch": 3, "multi_step_loss_iterations": 6, **options},
                                "omniglot": {"model": "vgg_mamlpp", "hidden": 4, "train": {"n_query": 5}}}},
    })


@pytest.mark.slow
def test_training_keeps_the_top_k_and_evaluation_ensembles_them(tmp_path, glyphs):
    import csv
    data = dict(prepared=glyphs / "prepared", episodes_dir=glyphs / "episodes")
    params = cell_params(tmp_path)
    runs.train_fewshot(params, "omniglot", "mamlpp", "5w1s", tmp_path / "run", progress=False, **data)
    with open(tmp_path / "run" / "curve.csv") as f:
        val = [(float(r["meta_val/query_acc"]), int(r["iteration"])) for r in csv.DictReader(f)
               if r.get("meta_val/query_acc")]
    assert [i for _, i in val] == [3, 6, 9, 12]
    expected = [i for _, i in sorted(val, key=lambda v: (-v[0], v[1]))[:3]]
    assert [e["iteration"] for e in read_top_k(tmp_path / "run")] == expected
    assert len(list((tmp_path / "run" / "topk").glob("*.pt"))) == 3
    metrics = runs.evaluate_fewshot(params, "omniglot", "mamlpp", "5w1s", tmp_path / "run", tmp_path / "eval", **data)
    assert metrics["ensemble_iterations"] == expected and metrics["inner_steps"] == 2

    # the same final model, evaluated alone, with its running statistics moved in the file
    def evaluate(eval_running_stats: bool, tag: str) -> list[float]:
        (tmp_path / tag).mkdir()
        p = cell_params(tmp_path / tag, ensemble=1, eval_running_stats=eval_running_stats)
        out = runs.evaluate_fewshot(p, "omniglot", "mamlpp", "5w1s", tmp_path / "run", tmp_path / tag / "eval", **data)
        return [v["acc"] for v in out["per_step"].values()]

    reads, ignores = evaluate(True, "reads"), evaluate(False, "ignores")
    state = load_torch(tmp_path / "run" / "model.pt")
    for key in state["learner"]:
        if key.endswith("running_var"):
            state["learner"][key] *= 50.0
    save_torch(tmp_path / "run" / "model.pt", state)
    assert evaluate(True, "reads2") != reads
    assert evaluate(False, "ignores2") == ignores
