"""bf16 autocast (`precision: bf16`) against fp32: the second-order meta-gradient on fixed batches.

bf16 keeps 8 bits of mantissa. One plain gradient of the Omniglot conv net comes out ~5% off fp32;
the inner loop amplifies that: its rounding moves the adapted weights, and the query gradient at
the moved weights differs more (with the inner loop alone kept in fp32 the error is 2% at 1 step).
Stated tolerance, from fixed batches (synthetic, 4 seeds; real Omniglot, 2), measured worst case in brackets:

    case              relative error ||g_bf16 - g_fp32|| / ||g_fp32||    cosine
    omniglot 1 step   <= 0.5   (0.36)                                      >= 0.90 (0.937)
    omniglot 5 steps  <= 0.9   (0.63)                                      >= 0.70 (0.805)
    sinusoid 1, 5     <= 0.15  (0.08)                                      >= 0.99 (0.9969)

and everywhere ||g_bf16 - g_fp32|| < the sampling standard error of the meta-batch's own mean
gradient (measured <= 0.66 of it): bf16 adds less noise than drawing another 8 tasks. The query
loss agrees within 0.8%. So bf16 is usable, but the conv net's meta-gradient is not "the fp32
gradient" (a 5% tolerance fails), which is why `precision` stays fp32 by default.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, write_params
from mamlbench import sinusoid
from mamlbench.algorithms import ALGORITHMS, build_algorithm
from mamlbench.algorithms.core import split_state, task_batch_norm
from mamlbench.algorithms.maml import MAML
from mamlbench.config import ConfigError, fewshot_cell, load_params
from mamlbench.data.sampler import EpisodeSampler
from mamlbench.data.sinusoid import fixed_test_tasks, task_batch
from mamlbench.fewshot import build_learner
from mamlbench.models.conv import build_model
from mamlbench.models.mlp import MLP

LOSS_RTOL = 0.02   # bf16 query loss vs fp32, relative (measured <= 0.8%)
SE_RATIO = 1.0     # bf16 error / sampling standard error of the meta-batch (measured <= 0.66)


def omniglot_batch(tasks: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """5-way 1-shot, 15 queries per class, from Omniglot-like binary 28x28 images (blocky strokes)."""
    g = torch.Generator().manual_seed(seed)
    strokes = F.interpolate(torch.rand(20, 1, 7, 7, generator=g), size=28) > 0.7   # one glyph per class
    flips = torch.rand(20, 20, 1, 28, 28, generator=g) < 0.03                        # 20 drawers each
    images = ((strokes[:, None] ^ flips) * 255).to(torch.uint8)
    return list(EpisodeSampler(images, n_way=5, k_shot=1, n_query=15, seed=seed).sample(tasks))


def sinusoid_batch(seed: int = 0) -> list[torch.Tensor]:
    return list(task_batch(25, 10, 10, torch.Generator().manual_seed(seed)))


def conv_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("conv4_omniglot", 5)


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP(1, [40, 40], 1)


def meta_gradient(learner: MAML, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean query loss, the meta-gradient flattened) of one meta-update on `batch`."""
    learner.zero_grad(set_to_none=True)
    out = learner(*batch)
    out.loss.backward()
    return out.loss.detach(), torch.cat([p.grad.flatten() for p in learner.parameters()])


CASES = {  # name: (model, batch, MAML kwargs, max relative error, min cosine)
    "omniglot-1step": (conv_net, omniglot_batch, dict(inner_lr=0.4, inner_steps=1), 0.5, 0.9),
    "omniglot-5steps": (conv_net, omniglot_batch, dict(inner_lr=0.4, inner_steps=5), 0.9, 0.7),
    "sinusoid-1step": (mlp, sinusoid_batch, dict(inner_lr=0.01, inner_steps=1, loss_fn=F.mse_loss), 0.15, 0.99),
    "sinusoid-5steps": (mlp, sinusoid_batch, dict(inner_lr=0.01, inner_steps=5, loss_fn=F.mse_loss), 0.15, 0.99),
}


def sampling_error(model: torch.nn.Module, batch: list[torch.Tensor], **kwargs) -> float:
    """Standard error of the meta-batch's mean gradient, from its per-task fp32 meta-gradients."""
    tasks = [[x[t:t + 1] for x in batch] for t in range(batch[0].shape[0])]
    grads = torch.stack([meta_gradient(MAML(copy.deepcopy(model), strategy="loop", **kwargs), task)[1]
                         for task in tasks])
    n = grads.shape[0]
    return ((grads - grads.mean(0)).pow(2).sum() / (n * (n - 1))).sqrt().item()


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_second_order_meta_gradient_is_within_tolerance_of_fp32(case, strategy, one_thread):
    make_model, make_batch, kwargs, rel_tol, cos_tol = CASES[case]
    model, batch = make_model(), make_batch()
    loss32, g32 = meta_gradient(MAML(copy.deepcopy(model), strategy=strategy, **kwargs), batch)
    loss16, g16 = meta_gradient(MAML(copy.deepcopy(model), strategy=strategy, precision="bf16", **kwargs), batch)
    error = (g16 - g32).norm().item()
    rel, cos = error / g32.norm().item(), F.cosine_similarity(g16, g32, dim=0).item()
    assert rel > 0, "bf16 gave the fp32 gradient bit for bit: autocast did not apply"
    assert rel <= rel_tol and cos >= cos_tol, f"{case}/{strategy}: relative error {rel:.4f}, cosine {cos:.5f}"
    assert error < SE_RATIO * sampling_error(model, batch, **kwargs), f"{case}/{strategy}: {error:.4g}"
    assert abs(loss16 - loss32) <= LOSS_RTOL * loss32, (loss16, loss32)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_fp32_is_the_default_and_changes_nothing(strategy, one_thread):
    batch = sinusoid_batch()
    model = mlp()
    plain = MAML(copy.deepcopy(model), inner_lr=0.01, inner_steps=2, strategy=strategy, loss_fn=F.mse_loss)
    explicit = MAML(copy.deepcopy(model), inner_lr=0.01, inner_steps=2, strategy=strategy, loss_fn=F.mse_loss,
                    precision="fp32")
    assert plain.precision == "fp32"
    (la, ga), (lb, gb) = meta_gradient(plain, batch), meta_gradient(explicit, batch)
    assert torch.equal(la, lb) and torch.equal(ga, gb)
    ta = plain.trajectory(*batch, inner_steps=3)
    assert torch.equal(ta, explicit.trajectory(*batch, inner_steps=3))
    built = build_algorithm("maml", copy.deepcopy(model), inner_lr=0.01, inner_steps=2, strategy=strategy,
                            loss_fn=F.mse_loss)
    assert built.precision == "fp32" and torch.equal(meta_gradient(built, batch)[1], ga)


def test_bf16_keeps_parameters_inner_steps_losses_and_grads_fp32(one_thread):
    batch = omniglot_batch(tasks=2)
    learner = MAML(conv_net(), inner_lr=0.4, inner_steps=2, strategy="loop", precision="bf16")
    out = learner(*batch)
    out.loss.backward()
    assert out.query_outputs.dtype == torch.bfloat16  # the activations did drop to bf16
    assert out.loss.dtype == out.task_losses.dtype == torch.float32
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in learner.parameters())
    # the inner SGD steps act on fp32 copies of the parameters, whatever autocast does to activations
    params, buffers = split_state(learner.model)
    with learner.autocast(batch[0].device), task_batch_norm(learner.model, batched=False):
        thetas = list(learner.steps(params, buffers, batch[0][0], batch[1][0], 2, batched=False, first_order=False))
    assert all(v.dtype == torch.float32 for theta in thetas for v in theta.values())
    # evaluation runs under autocast too, and still reports fp32 losses close to fp32's (measured 2.3% apart)
    bf16_traj = learner.trajectory(*batch, inner_steps=3)
    learner.precision = "fp32"
    fp32_traj = learner.trajectory(*batch, inner_steps=3)
    assert bf16_traj.dtype == torch.float32 and not torch.equal(bf16_traj, fp32_traj)
    torch.testing.assert_close(bf16_traj, fp32_traj, rtol=0.05, atol=0)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_variant_takes_the_precision_through_build_algorithm(name, one_thread):
    batch = omniglot_batch(tasks=2)
    learner = build_algorithm(name, conv_net(), inner_lr=0.1, inner_steps=1, precision="bf16")
    out = learner(*batch)  # Reptile and MAML++ override forward: autocast must still reach it
    assert learner.precision == "bf16" and out.query_outputs.dtype == torch.bfloat16
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        build_algorithm(name, conv_net(), inner_lr=0.1, inner_steps=1, precision="fp16")


def test_precision_knob_is_validated_and_reaches_the_learner(tmp_path):
    params = load_params(write_params(tmp_path / "ok.yaml", {"omniglot": {"train": {"precision": "bf16"}}}))
    cfg = fewshot_cell(params, "omniglot", "anil", "5w1s")
    assert cfg.train.precision == "bf16" and load_params(ROOT / "params.yaml").omniglot.train.precision == "fp32"
    assert build_learner(params, "omniglot", "anil", "5w1s", cfg, 1, 28).precision == "bf16"
    with pytest.raises(ConfigError, match=r"omniglot\.train\.precision"):
        load_params(write_params(tmp_path / "bad.yaml", {"omniglot": {"train": {"precision": "fp16"}}}))
    with pytest.raises(ConfigError, match=r"sinusoid\.train\.precision"):
        load_params(write_params(tmp_path / "bad2.yaml", {"sinusoid": {"train": {"precision": "half"}}}))


def test_bf16_meta_training_learns_the_sinusoid_as_fp32_does(tmp_path, one_thread):
    """600 meta-updates through `sinusoid.train` and the knob; measured MSE 3.87 -> 2.18 in both precisions."""
    _, support_x, support_y, query_x, query_y = fixed_test_tasks(100, 10, 50, seed=1)

    def mse_after_one_step(model: torch.nn.Module) -> float:
        learner = MAML(model, inner_lr=0.01, loss_fn=F.mse_loss)  # scored in fp32
        return learner.trajectory(support_x, support_y, query_x, query_y, inner_steps=1)[:, 1].mean().item()

    after = {}
    for precision in ("fp32", "bf16"):
        params = load_params(write_params(tmp_path / f"{precision}.yaml", {
            "profile": "t", "profiles": {"t": {}}, "tracking": {"enabled": False},
            # torch's init: from the reference's N(0, 0.01) 600 updates barely move (tests/test_sinusoid.py)
            "sinusoid": {"init": "torch", "train": {"precision": precision, "iterations": 600, "meta_batch_size": 10,
                                   "checkpoint_every": 600, "log_every": 100}}}))
        sinusoid.train(params, "maml", tmp_path / precision, progress=False)
        after[precision] = mse_after_one_step(sinusoid.load_model(tmp_path / precision / "model.pt"))
    before = mse_after_one_step(sinusoid.build_model(params))
    assert after["bf16"] < 0.7 * before, (before, after)
    assert abs(after["bf16"] - after["fp32"]) < 0.1 * after["fp32"], after
