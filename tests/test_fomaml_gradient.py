"""First-order MAML's meta-gradient against its definition, computed by hand in float64.

First-order MAML treats the inner-loop gradients as constants, so the adapted parameters
theta' = theta - alpha * grad L_support(theta) (repeated per inner step) pass the query gradient
straight back: its meta-gradient is grad_{theta'} L_query(theta'), applied to theta. That is all
that separates it from MAML, whose meta-gradient carries the Jacobian (I - alpha * Hessian) of
each step. The expected values below come from a functional copy of the network (F.linear,
F.batch_norm with the task's batch statistics) and plain `torch.autograd.grad`, never from the
code under test; the learner is the one `fomaml` names in `build_algorithm`, with the losses the
few-shot pipeline trains with (mean cross-entropy, or the original MAML code's sum / K).

The second-order gradient of the same task is computed by hand too, and the learner must be far
from it: a first-order learner that silently kept the second-order term would match it instead.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mamlbench.algorithms import build_algorithm
from mamlbench.fewshot import classification_loss

WAYS, SHOTS, QUERIES, FEATURES, HIDDEN = 3, 2, 3, 5, 8
EPS = 1e-3  # the BatchNorm eps of the benchmark's networks


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.BatchNorm1d(HIDDEN, eps=EPS), nn.ReLU(),
                         nn.Linear(HIDDEN, WAYS)).double()


def by_hand(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The same network as `network()`, written out; BatchNorm with the batch's own statistics."""
    h = F.linear(x, p["0.weight"], p["0.bias"])
    h = F.batch_norm(h, None, None, p["1.weight"], p["1.bias"], training=True, eps=EPS)
    return F.linear(torch.relu(h), p["3.weight"], p["3.bias"])


def hand_loss(reduction: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, or the original MAML code's sum over examples of cross-entropy / K."""
    nll = -logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    return nll.mean() if reduction == "mean" else nll.sum() / SHOTS


def task():
    g = torch.Generator().manual_seed(1)
    support_x = torch.randn(1, WAYS * SHOTS, FEATURES, generator=g, dtype=torch.float64)
    query_x = torch.randn(1, WAYS * QUERIES, FEATURES, generator=g, dtype=torch.float64)
    support_y = torch.arange(WAYS).repeat_interleave(SHOTS)[None]
    query_y = torch.arange(WAYS).repeat_interleave(QUERIES)[None]
    return support_x, support_y, query_x, query_y


def adapted_names(model: nn.Module, adapt_norm: bool) -> list[str]:
    return [k for k, _ in model.named_parameters() if adapt_norm or not k.startswith("1.")]


def hand_first_order(model, batch, alpha, steps, reduction, adapt_norm) -> dict[str, torch.Tensor]:
    """grad_{theta'} L_query(theta'), theta' reached by `steps` SGD steps whose gradients are constants."""
    sx, sy, qx, qy = (t[0] for t in batch)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    adapted = adapted_names(model, adapt_norm)
    for _ in range(steps):
        leaves = {k: v.clone().requires_grad_(k in adapted) for k, v in params.items()}
        grads = torch.autograd.grad(hand_loss(reduction, by_hand(leaves, sx), sy), [leaves[k] for k in adapted])
        params = {**params, **{k: (leaves[k] - alpha * g).detach() for k, g in zip(adapted, grads)}}
    at_adapted = {k: v.clone().requires_grad_() for k, v in params.items()}
    grads = torch.autograd.grad(hand_loss(reduction, by_hand(at_adapted, qx), qy), list(at_adapted.values()))
    return dict(zip(at_adapted, grads))


def hand_second_order(model, batch, alpha, steps, reduction, adapt_norm) -> dict[str, torch.Tensor]:
    """MAML's meta-gradient: the query loss differentiated through every inner step."""
    sx, sy, qx, qy = (t[0] for t in batch)
    theta = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
    adapted = adapted_names(model, adapt_norm)
    fast = dict(theta)
    for _ in range(steps):
        grads = torch.autograd.grad(hand_loss(reduction, by_hand(fast, sx), sy), [fast[k] for k in adapted],
                                    create_graph=True)
        fast = {**fast, **{k: fast[k] - alpha * g for k, g in zip(adapted, grads)}}
    grads = torch.autograd.grad(hand_loss(reduction, by_hand(fast, qx), qy), list(theta.values()))
    return dict(zip(theta, grads))


def hand_unadapted(model, batch, reduction) -> dict[str, torch.Tensor]:
    """The query gradient at theta itself: what a learner that skipped the inner loop would return."""
    _, _, qx, qy = (t[0] for t in batch)
    theta = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
    grads = torch.autograd.grad(hand_loss(reduction, by_hand(theta, qx), qy), list(theta.values()))
    return dict(zip(theta, grads))


def learner_grads(name, batch, alpha, steps, reduction, adapt_norm, strategy) -> dict[str, torch.Tensor]:
    model = network()
    learner = build_algorithm(name, model, inner_lr=alpha, inner_steps=steps, strategy=strategy,
                              loss_fn=classification_loss(reduction, SHOTS), adapt_norm=adapt_norm)
    learner.zero_grad(set_to_none=True)
    learner(*batch).loss.backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Relative distance of two whole gradients (all parameters flattened together)."""
    fa, fb = torch.cat([a[k].flatten() for k in a]), torch.cat([b[k].flatten() for k in a])
    return ((fa - fb).norm() / fb.norm()).item()


# alpha 0.25 under mean and 0.1 under shot_sum (0.1 * N = 0.3 on the mean): steps big enough that the
# adapted point, and the second-order term, matter.
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("adapt_norm", [True, False], ids=["norm-adapted", "norm-frozen"])
@pytest.mark.parametrize("reduction, alpha", [("mean", 0.25), ("shot_sum", 0.1)])
@pytest.mark.parametrize("steps", [1, 2])
def test_fomaml_meta_gradient_is_the_query_gradient_at_the_adapted_parameters(steps, reduction, alpha,
                                                                              adapt_norm, strategy):
    batch = task()
    got = learner_grads("fomaml", batch, alpha, steps, reduction, adapt_norm, strategy)
    want = hand_first_order(network(), batch, alpha, steps, reduction, adapt_norm)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-12, msg=f"{k}: not the first-order gradient")

    second = hand_second_order(network(), batch, alpha, steps, reduction, adapt_norm)
    assert distance(got, second) > 0.05, "first-order MAML returned the second-order meta-gradient"
    assert distance(got, hand_unadapted(network(), batch, reduction)) > 0.05, "no adaptation before the query"
    # The hand second-order gradient is MAML's, so the gap above is the second-order term, not a slip
    # of the hand reference.
    maml = learner_grads("maml", batch, alpha, steps, reduction, adapt_norm, strategy)
    for k in second:
        torch.testing.assert_close(maml[k], second[k], rtol=0, atol=1e-12, msg=f"{k}: not MAML's gradient")
