"""`strategy: auto` by measurement (issue 17): the probe leaves no trace on the run, its choice is
cached and kept in the checkpoint, and a run that probed equals one told its choice."""
from __future__ import annotations

import json

import pytest
import torch

from mamlbench import autostrategy, runs
from mamlbench.algorithms import build_algorithm
from mamlbench.io import load_torch
from mamlbench.models.conv import build_model
from mamlbench.train import meta_update
from test_fewshot import glyphs, tiny  # noqa: F401  (the module's synthetic Omniglot and its params)


@pytest.fixture(autouse=True)
def no_compile_and_a_private_cache(monkeypatch, tmp_path):
    """Compiling on the CPU takes a minute: the tests probe loop and vmap (the same code path)."""
    monkeypatch.setattr(autostrategy, "CANDIDATES", ("loop", "vmap"))
    monkeypatch.setenv(autostrategy.CACHE_ENV, str(tmp_path / "cache"))


def _learner():
    torch.manual_seed(0)
    model = build_model("conv4_omniglot", 5, in_channels=1, image_size=28, hidden=8)
    return build_algorithm("maml", model, inner_lr=0.4, inner_steps=1)


def _batch():
    g = torch.Generator().manual_seed(1)
    return (torch.rand(4, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(4, 1),
            torch.rand(4, 10, 1, 28, 28, generator=g), torch.arange(5).repeat_interleave(2).repeat(4, 1))


def _step(learner, optimizer, batch):
    meta_update(learner, optimizer, batch, None)


def test_the_probe_restores_weights_buffers_and_rng_and_times_each_strategy():
    learner = _learner()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    rng = torch.get_rng_state()
    timings = autostrategy.probe(learner, _batch(), _step, torch.device("cpu"), steps=2)
    assert set(timings) == {"loop", "vmap"} and all(r["step_s"] > 0 and r["warmup_s"] > 0 for r in timings.values())
    assert all(r["peak_bytes"] >= 0 for r in timings.values())   # Linux: the resident set's rise
    after = learner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # Adam stepped, then the state came back
    assert torch.equal(torch.get_rng_state(), rng) and learner.strategy == "auto"
    assert autostrategy.fastest({"loop": {"step_s": 2.0}, "vmap": {"step_s": 1.0}, "compiled": {"error": "oom"}}) == "vmap"
    assert autostrategy.fastest({"loop": {"step_s": 1.0}, "vmap": {"step_s": 1.0}}) == "loop"   # a tie: the simplest


def test_the_choice_is_cached_per_key_and_variants_with_their_own_forward_are_not_probed(tmp_path):
    learner, batch, calls = _learner(), _batch(), []

    def counted(*args):
        calls.append(1)
        _step(*args)
    first = autostrategy.choose(learner, batch, counted, torch.device("cpu"), "maml", steps=1)
    assert not first["cached"] and first["choice"] in ("loop", "vmap") and len(calls) == 4   # 2 x (warm-up + 1)
    again = autostrategy.choose(learner, batch, counted, torch.device("cpu"), "maml", steps=1)
    assert again["cached"] and again["choice"] == first["choice"] and len(calls) == 4
    other_shapes = tuple(t[:2] for t in batch)
    assert not autostrategy.choose(learner, other_shapes, counted, torch.device("cpu"), "maml", steps=1)["cached"]
    stored = json.loads((tmp_path / "cache" / "strategy.json").read_text())
    assert len(stored) == 2 and all(e["torch"] == torch.__version__ for e in stored.values())
    protonet = build_algorithm("protonet", build_model("conv4_omniglot", 5, in_channels=1, image_size=28, hidden=8),
                               inner_lr=0.1, inner_steps=1)
    assert autostrategy.eligible(protonet) == [] and autostrategy.eligible(learner) == ["loop", "vmap"]


def test_a_memory_ratio_caps_the_speed_bought_with_memory():
    timings = {"loop": {"step_s": 0.40, "peak_bytes": 12 << 20}, "vmap": {"step_s": 0.22, "peak_bytes": 275 << 20},
               "compiled": {"step_s": 0.17, "peak_bytes": 205 << 20}}
    assert autostrategy.fastest(timings) == "compiled"
    assert autostrategy.fastest(timings, max_memory_ratio=1.5) == "loop"
    assert autostrategy.fastest(timings, max_memory_ratio=20) == "compiled"
    assert autostrategy.fastest(timings, max_memory_ratio=17) == "loop"     # 205 > 17 x 12, 275 too
    failed = {**timings, "compiled": {"error": "out of memory"}}
    assert autostrategy.fastest(failed, max_memory_ratio=30) == "vmap"


def test_a_run_too_short_to_repay_compiling_probes_without_it(tmp_path, glyphs, monkeypatch):  # noqa: F811
    monkeypatch.setattr(autostrategy, "CANDIDATES", ("loop", "vmap", "compiled"))
    data = dict(prepared=glyphs / "prepared", episodes_dir=glyphs / "episodes")
    (tmp_path / "p").mkdir()
    short = tiny(tmp_path / "p", probe_min_iterations=1, compile_min_iterations=10**6, probe_steps=1)
    runs.train_fewshot(short, "omniglot", "maml", "5w1s", tmp_path / "a", progress=False, **data)
    chosen = json.loads((tmp_path / "a" / "train.json").read_text())["strategy"]
    assert chosen["how"] == "probe" and set(chosen["timings"]) == {"loop", "vmap"}
    unprobed = tiny(tmp_path / "p", probe_min_iterations=10**6)
    runs.train_fewshot(unprobed, "omniglot", "maml", "5w1s", tmp_path / "b", progress=False, **data)
    assert json.loads((tmp_path / "b" / "train.json").read_text())["strategy"] == {"choice": "auto", "how": "rule"}


@pytest.mark.slow   # three short trainings and a resume
def test_a_probing_run_equals_a_run_told_its_choice_and_a_resume_keeps_it(tmp_path, glyphs, monkeypatch):  # noqa: F811
    data = dict(prepared=glyphs / "prepared", episodes_dir=glyphs / "episodes")
    (tmp_path / "p").mkdir(), (tmp_path / "t").mkdir()
    probing = tiny(tmp_path / "p", probe_min_iterations=1, probe_steps=1)
    runs.train_fewshot(probing, "omniglot", "maml", "5w1s", tmp_path / "a", progress=False, **data)
    chosen = json.loads((tmp_path / "a" / "train.json").read_text())["strategy"]
    assert chosen["how"] == "probe" and set(chosen["timings"]) == {"loop", "vmap"}

    told = tiny(tmp_path / "t", strategy=chosen["choice"])
    runs.train_fewshot(told, "omniglot", "maml", "5w1s", tmp_path / "b", progress=False, **data)
    a, b = load_torch(tmp_path / "a" / "model.pt")["learner"], load_torch(tmp_path / "b" / "model.pt")["learner"]
    assert all(torch.equal(a[k], b[k]) for k in a), "the probe changed the run"
    assert (tmp_path / "a" / "curve.csv").read_text() == (tmp_path / "b" / "curve.csv").read_text()

    # resumed from its checkpoint at 6: the stored choice, no probe (one would fail here)
    for name in ("checkpoints/ckpt-00000012.pt", "model.pt", "train.json"):
        (tmp_path / "a" / name).unlink()
    monkeypatch.setattr(autostrategy, "probe", lambda *a, **k: pytest.fail("a resumed run probed again"))
    resumed = runs.train_fewshot(probing, "omniglot", "maml", "5w1s", tmp_path / "a", progress=False, **data)
    assert resumed["resumed_from"] == 6
    assert json.loads((tmp_path / "a" / "train.json").read_text())["strategy"]["choice"] == chosen["choice"]
    assert all(torch.equal(a[k], load_torch(tmp_path / "a" / "model.pt")["learner"][k]) for k in a)
