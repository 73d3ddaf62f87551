"""The meta-learning core against references written independently of it, in float64.

The reference is the textbook per-task loop: explicit functional networks (F.conv2d, F.batch_norm
with batch statistics), `torch.autograd.grad(create_graph=True)` for the inner step, query losses
summed over tasks, one backward.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mamlbench.algorithms.core as core
from mamlbench.algorithms.maml import MAML

TASKS, WAYS = 5, 3


def conv_net() -> nn.Module:
    # No conv bias before BatchNorm: under batch statistics its gradient is exactly zero.
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, WAYS))


def conv_ref(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = F.batch_norm(F.conv2d(x, p[0]), None, None, p[1], p[2], training=True)
    h = F.max_pool2d(F.relu(h), 2)
    h = F.relu(F.batch_norm(F.conv2d(h, p[3], padding=1), None, None, p[4], p[5], training=True))
    return F.linear(h.flatten(1), p[6], p[7])


def mlp_net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, WAYS))


def mlp_ref(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(F.linear(x, p[0], p[1]))
    h = torch.tanh(F.linear(h, p[2], p[3]))
    return F.linear(h, p[4], p[5])


def episodes(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 8, 8) if kind == "conv" else (2,)
    support_x = torch.randn(TASKS, WAYS * 2, *shape, generator=g, dtype=torch.float64)
    query_x = torch.randn(TASKS, WAYS * 3, *shape, generator=g, dtype=torch.float64)
    support_y = torch.arange(WAYS).repeat(TASKS, 2)
    query_y = torch.arange(WAYS).repeat(TASKS, 3)
    return support_x, support_y, query_x, query_y


def setup(kind: str):
    torch.manual_seed(1)
    model = (conv_net() if kind == "conv" else mlp_net()).double()
    return model, (conv_ref if kind == "conv" else mlp_ref), episodes(kind)


def reference_meta_grad(model, ref, batch, inner_lr, inner_steps, first_order=False):
    support_x, support_y, query_x, query_y = batch
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    total = 0.0
    for t in range(TASKS):
        fast = theta
        for _ in range(inner_steps):
            loss = F.cross_entropy(ref(fast, support_x[t]), support_y[t])
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [w - inner_lr * g for w, g in zip(fast, grads)]
        total = total + F.cross_entropy(ref(fast, query_x[t]), query_y[t]) / TASKS
    return total.detach(), torch.autograd.grad(total, theta)


def core_meta_grad(model, batch, inner_lr, inner_steps, strategy, first_order=False):
    model.zero_grad(set_to_none=True)
    out = MAML(model, inner_lr=inner_lr, inner_steps=inner_steps, strategy=strategy, first_order=first_order)(*batch)
    out.loss.backward()
    return out, [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).norm() / y.norm().clamp_min(1e-30)).item() for x, y in zip(a, b))


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_per_task_reference(kind, strategy, first_order):
    model, ref, batch = setup(kind)
    want_loss, want = reference_meta_grad(model, ref, batch, 0.3, 2, first_order)
    out, got = core_meta_grad(model, batch, 0.3, 2, strategy, first_order)
    torch.testing.assert_close(out.loss.detach(), want_loss, rtol=1e-10, atol=0)
    assert rel_err(got, want) < 1e-5, f"{kind}/{strategy}: relative error {rel_err(got, want):.2e}"


def test_gradient_check_catches_vmapped_native_batch_norm(monkeypatch):
    """The comparison above must fail for the known-wrong route: F.batch_norm under vmap, second order."""
    model, ref, batch = setup("conv")
    _, want = reference_meta_grad(model, ref, batch, 0.3, 2)
    monkeypatch.setattr(core, "_batched_batch_norm", core._per_task_batch_norm)
    _, got = core_meta_grad(model, batch, 0.3, 2, "vmap")
    assert rel_err(got, want) > 1e-5, "the vmap batch-norm defect went unnoticed"


def test_first_order_equals_its_definition():
    """FOMAML's gradient is the query gradient at the adapted parameters, averaged over tasks."""
    model, ref, batch = setup("mlp")
    support_x, support_y, query_x, query_y = batch
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for t in range(TASKS):
        fast = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for _ in range(2):
            grads = torch.autograd.grad(F.cross_entropy(ref(fast, support_x[t]), support_y[t]), fast)
            fast = [(w - 0.3 * g).detach().requires_grad_() for w, g in zip(fast, grads)]
        query_grads = torch.autograd.grad(F.cross_entropy(ref(fast, query_x[t]), query_y[t]), fast)
        expected = [e + g / TASKS for e, g in zip(expected, query_grads)]
    for strategy in ("vmap", "loop"):
        _, got = core_meta_grad(model, batch, 0.3, 2, strategy, first_order=True)
        assert rel_err(got, expected) < 1e-10


def test_second_order_term_against_finite_differences():
    """Central differences of the MAML objective agree with the second-order meta-gradient, not the first-order one."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    support_x, support_y, query_x, query_y = episodes("mlp", seed=4)
    support_y, query_y = support_y % 2, query_y % 2
    batch = (support_x[:2], support_y[:2], query_x[:2], query_y[:2])
    maml = MAML(model, inner_lr=0.5, inner_steps=2, strategy="loop")

    def objective() -> float:
        with torch.no_grad():
            # forward() under no_grad still adapts (the inner gradient enables grad itself)
            return sum(maml.trajectory(*batch, inner_steps=2)[:, 2].tolist()) / 2

    numeric = []
    eps = 1e-6
    for p in model.parameters():
        flat = p.data.view(-1)
        grad = torch.zeros_like(flat)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            up = objective()
            flat[i] = old - eps
            down = objective()
            flat[i] = old
            grad[i] = (up - down) / (2 * eps)
        numeric.append(grad.view_as(p))
    _, second = core_meta_grad(model, batch, 0.5, 2, "vmap")
    _, first = core_meta_grad(model, batch, 0.5, 2, "vmap", first_order=True)
    assert rel_err(second, numeric) < 1e-6
    assert rel_err(first, numeric) > 1e-3, "tiny model too linear: first order indistinguishable"


def test_vmap_and_loop_give_same_losses_and_outputs():
    model, _, batch = setup("conv")
    a = MAML(model, inner_lr=0.2, inner_steps=3, strategy="vmap")(*batch)
    b = MAML(model, inner_lr=0.2, inner_steps=3, strategy="loop")(*batch)
    torch.testing.assert_close(a.task_losses, b.task_losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.query_outputs, b.query_outputs, rtol=1e-10, atol=1e-10)
    ta = MAML(model, inner_lr=0.2, strategy="vmap").trajectory(*batch, inner_steps=3)
    tb = MAML(model, inner_lr=0.2, strategy="loop").trajectory(*batch, inner_steps=3)
    assert ta.shape == (TASKS, 4)
    torch.testing.assert_close(ta, tb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ta[:, 3], a.task_losses, rtol=1e-10, atol=1e-10)


class Frozen(nn.Module):
    """A frozen embedding, a trainable head, a buffer the forward reads, and a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(2, 8)
        self.embed.requires_grad_(False)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, WAYS)
        self.register_buffer("scale", torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.embed(x) * self.scale)))


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_buffers_frozen_params_and_no_batch_norm_leak(strategy):
    torch.manual_seed(0)
    model = Frozen().double().eval()  # eval mode too: MAML normalises with each task's batch statistics
    batch = episodes("mlp")
    running = (model.norm.running_mean.clone(), model.norm.running_var.clone(), model.norm.num_batches_tracked.clone())
    embed = model.embed.weight.clone()
    out, _ = core_meta_grad(model, batch, 0.3, 1, strategy)
    assert model.embed.weight.grad is None and torch.equal(model.embed.weight, embed)
    assert model.head.weight.grad is not None and model.norm.weight.grad is not None
    for before, after in zip(running, (model.norm.running_mean, model.norm.running_var, model.norm.num_batches_tracked)):
        assert torch.equal(before, after), "running statistics changed: tasks would leak into each other"
    # batch statistics: each task's normalised features have zero mean whatever the running buffers say
    model.norm.running_mean.fill_(100.0)
    again, _ = core_meta_grad(model, batch, 0.3, 1, strategy)
    torch.testing.assert_close(again.task_losses, out.task_losses)
    params, buffers = core.split_state(model)
    assert set(params) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert {"embed.weight", "scale", "norm.running_mean"} <= set(buffers)


def test_trajectory_steps_are_plain_sgd():
    model, ref, batch = setup("mlp")
    support_x, support_y, query_x, query_y = batch
    traj = MAML(model, inner_lr=0.1, strategy="loop").trajectory(*batch, inner_steps=1)
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for t in range(TASKS):
        before = F.cross_entropy(ref(theta, query_x[t]), query_y[t])
        grads = torch.autograd.grad(F.cross_entropy(ref(theta, support_x[t]), support_y[t]), theta)
        after = F.cross_entropy(ref([w - 0.1 * g for w, g in zip(theta, grads)], query_x[t]), query_y[t])
        torch.testing.assert_close(traj[t], torch.stack([before, after]).detach())


def test_auto_strategy_per_device_and_model():
    assert core.choose_strategy(conv_net(), "cpu") == "loop"
    assert core.choose_strategy(mlp_net(), "cpu") == "vmap"
    assert core.choose_strategy(conv_net(), "cuda") == "compiled"


def test_five_line_api_on_a_user_model_learns():
    """The README example: any nn.Module, a few lines, the meta-loss falls."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    maml = MAML(model, inner_lr=0.01, inner_steps=1, loss_fn=F.mse_loss)
    opt = torch.optim.Adam(maml.parameters(), lr=2e-3)
    from mamlbench.data.sinusoid import task_batch
    losses = []
    for i in range(400):
        out = maml(*task_batch(25, 10, 10, torch.Generator().manual_seed(i)))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-50:]) / 50 < 0.6 * sum(losses[:50]) / 50


@pytest.mark.parametrize("first_order", [False, True])
def test_checkpointed_inner_steps_give_the_same_meta_gradient(first_order):
    model, ref, batch = setup("conv")
    _, plain = core_meta_grad(model, batch, 0.3, 3, "loop", first_order)
    model.zero_grad(set_to_none=True)
    out = MAML(model, inner_lr=0.3, inner_steps=3, strategy="loop", first_order=first_order, checkpointing=True)(*batch)
    out.loss.backward()
    assert rel_err([p.grad for p in model.parameters()], plain) < 1e-12
