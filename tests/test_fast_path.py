"""The compiled fast path (`strategy="compiled"`, mamlbench/algorithms/fast.py) against the eager
strategies and the float64 per-task reference of tests/test_core.py.

Fast tests compile with the `aot_eager` backend (dynamo + AOTAutograd: the same capture, functorch
transforms flattened into one forward-only graph, without Inductor's code generation); the slow ones
with Inductor, the backend the fast path runs with.
"""
from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mamlbench.algorithms.core as core
from mamlbench.algorithms import build_algorithm, fast
from mamlbench.algorithms.maml import MAML
from mamlbench.models.conv import build_model
from test_core import TASKS, WAYS, core_meta_grad, reference_meta_grad, rel_err, setup

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(fast, "BACKEND", "aot_eager")


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def check_against_reference(kind: str, first_order: bool) -> None:
    model, ref, batch = setup(kind)
    want_loss, want = reference_meta_grad(model, ref, batch, 0.3, 2, first_order)
    _, eager = core_meta_grad(model, batch, 0.3, 2, "vmap", first_order)
    graphs = compiled_graphs()
    out, got = core_meta_grad(model, batch, 0.3, 2, "compiled", first_order)
    assert compiled_graphs() == graphs + 1, "the meta-step was not captured as one graph"
    assert all(g is not None for g in got)
    torch.testing.assert_close(out.loss.detach(), want_loss, rtol=1e-10, atol=0)
    assert out.task_losses.shape == (TASKS,) and out.query_outputs.shape == (TASKS, WAYS * 3, WAYS)
    assert rel_err(got, want) < 1e-5, f"{kind}: relative error {rel_err(got, want):.2e} against the reference"
    assert rel_err(got, eager) < 1e-10, f"{kind}: compiled and eager vmap differ by {rel_err(got, eager):.2e}"
    # A second call reuses the graph (no recompilation) and gives the same gradient.
    _, again = core_meta_grad(model, batch, 0.3, 2, "compiled", first_order)
    assert compiled_graphs() == graphs + 1
    assert rel_err(again, got) == 0.0


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("first_order", [False, True])
def test_captured_meta_step_matches_reference(kind, first_order, aot_eager):
    assert fast.unsupported(MAML(setup(kind)[0])) is None
    check_against_reference(kind, first_order)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("first_order", [False, True])
def test_inductor_compiled_meta_step_matches_reference(kind, first_order):
    """The production backend: second order (nested torch.func.grad) compiles too, BatchNorm included."""
    check_against_reference(kind, first_order)


def learner_grads(learner, batch):
    learner.zero_grad(set_to_none=True)
    out = learner(*batch)
    out.loss.backward()
    return out, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in learner.parameters()]


@pytest.mark.parametrize("name", ["metasgd", "anil", "fomaml", "boil"])
def test_hook_only_variants_match_their_loop(name, aot_eager):
    """Meta-SGD's learned rates get their meta-gradient too; ANIL adapts the head only, BOIL all but the head."""
    _, _, batch = setup("conv")
    torch.manual_seed(0)
    model = build_model("conv4_omniglot", WAYS, in_channels=1, image_size=8, hidden=4).double()
    results = {}
    for strategy in ("loop", "compiled"):
        learner = build_algorithm(name, model, inner_lr=0.3, inner_steps=2, strategy=strategy).double()
        if name == "metasgd":  # distinct rates per entry, so a mix-up between them would show
            with torch.no_grad():
                for p in learner.lrs.values():
                    p.uniform_(0.1, 0.5, generator=torch.Generator().manual_seed(0))
        results[strategy] = learner_grads(learner, batch)
    (loop_out, loop), (out, got) = results["loop"], results["compiled"]
    torch.testing.assert_close(out.task_losses, loop_out.task_losses, rtol=1e-10, atol=1e-12)
    assert rel_err(got, loop) < 1e-9
    if name == "metasgd":
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.lrs.values())


@pytest.mark.parametrize("name", ["reptile", "mamlpp", "protonet", "protomaml", "cavia", "imaml"])
def test_variants_that_replace_the_inner_loop_are_refused(name):
    model = build_model("conv4_omniglot", WAYS, in_channels=1, image_size=8, hidden=4)
    with pytest.raises(ValueError, match="strategy 'compiled': .* overrides"):
        build_algorithm(name, model, inner_lr=0.3, inner_steps=2, strategy="compiled")
    # auto on CUDA would pick compiled: such learners get vmap instead
    learner = build_algorithm(name, model, inner_lr=0.3, inner_steps=2, strategy="auto",
                              params={"per_step_bn_stats": False} if name == "mamlpp" else None)
    assert learner.resolve_strategy(torch.device("cuda")) == "vmap"
    assert learner.resolve_strategy(torch.device("cpu")) == "loop"


def test_auto_picks_compiled_on_cuda_only():
    model, _, _ = setup("conv")
    assert core.choose_strategy(model, "cuda") == "compiled"
    assert core.choose_strategy(model, "cpu") == "loop"
    assert core.choose_strategy(setup("mlp")[0], "cpu") == "vmap"
    assert MAML(model).resolve_strategy(torch.device("cuda:0")) == "compiled"
    with pytest.raises(ValueError, match="strategy must be auto, vmap, loop, compiled"):
        MAML(model, strategy="graph")


def test_training_steps_equal_vmap_and_eval_paths_reuse_vmap(aot_eager):
    """Three Adam meta-updates land on the same weights; no_grad forward and trajectory work unchanged."""
    _, _, batch = setup("mlp")
    states = {}
    for strategy in ("vmap", "compiled"):
        torch.manual_seed(0)
        learner = MAML(setup("mlp")[0], inner_lr=0.3, inner_steps=1, strategy=strategy)
        opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
        for _ in range(3):
            out = learner(*batch)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        with torch.no_grad():
            evaluated = learner(*batch).task_losses
        states[strategy] = ([p.detach().clone() for p in learner.parameters()], evaluated,
                            learner.trajectory(*batch, inner_steps=2))
    for a, b in zip(states["vmap"], states["compiled"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_compile_failure_falls_back_to_eager_with_one_warning(aot_eager):
    """A loss dynamo cannot capture in one graph: the same functional step runs eagerly, warned once."""
    def breaking_loss(out, y):
        torch._dynamo.graph_break()
        return F.cross_entropy(out, y)

    model, ref, batch = setup("mlp")
    _, want = reference_meta_grad(model, ref, batch, 0.3, 2)
    learner = MAML(model, inner_lr=0.3, inner_steps=2, strategy="compiled", loss_fn=breaking_loss)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        _, got = learner_grads(learner, batch)
    assert not fast.uses_compiler(learner)
    assert rel_err(got, want) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, again = learner_grads(learner, batch)
    assert rel_err(again, got) == 0.0


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_cpu(tmp_path):
    """benchmarks/gpu_check.py --smoke: every section of the GPU script on tiny shapes."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout
    for variant in ("fast path", "per-task loop", "learn2learn-style", "vmap (eager)"):
        for precision in ("fp32", "bf16"):  # first-call seconds, then a finite s/iter
            assert re.search(rf"^{re.escape(variant)}\s+{precision}\s+[\d.]+\s+\d+\.\d+\s", text, re.M), \
                f"no timing for {variant} {precision} in:\n{text[-3000:]}"
    assert "peak MiB" in text and "compilation failed" not in text
    # wall_s, iteration, it/s, train_acc, val_acc: a validation row of the training section
    assert re.search(r"^\s*[\d.]+\s+\d+\s+[\d.]+\s+[\d.]+\s+[01]\.\d{4}\s*$", text, re.M), text[-3000:]
