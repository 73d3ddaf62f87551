"""The reference set: profile `reference` is the paper's protocol but for its budget, and its report
states each cell's result, budget and provenance from the run folders alone."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from mamlbench.config import fewshot_cell, load_params
from mamlbench.reference import build_reference, in_reference_set, validation_curve

BUDGET_KEYS = {"time_budget_minutes", "validate_every", "n_val_episodes"}


@pytest.mark.parametrize("algorithm,setting", [(a, s) for a in ("maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile",
                                                                 "boil", "protonet", "protomaml", "cavia", "imaml")
                                               for s in ("5w1s", "5w5s", "20w1s", "20w5s") if in_reference_set(a, s)])
def test_reference_profile_is_the_paper_protocol_but_for_its_budget(algorithm, setting):
    paper = fewshot_cell(load_params(ROOT / "params.yaml", profile="paper"), "omniglot", algorithm, setting)
    ref = fewshot_cell(load_params(ROOT / "params.yaml", profile="reference"), "omniglot", algorithm, setting)
    assert ref.train.time_budget_minutes == 10 and paper.train.time_budget_minutes is None
    strip = {k: None for k in BUDGET_KEYS}
    assert dataclasses.replace(ref.train, **strip) == dataclasses.replace(paper.train, **strip)
    assert (ref.evaluate, ref.options, ref.model, ref.hidden, ref.norm, ref.norm_eps, ref.init) == (
        paper.evaluate, paper.options, paper.model, paper.hidden, paper.norm, paper.norm_eps, paper.init)


def _provenance(iterations: int, seconds: float) -> dict:
    return {"code_hash": "c0de", "data_hash": "da7a", "settings_hash": "5e77", "git_commit": "abcdef1234567",
            "git_dirty": False, "profile": "reference", "torch": "2.14.1", "cuda": None, "mujoco": None,
            "device_name": "cpu: test", "threads": 1, "iterations": iterations, "wall_seconds": seconds,
            "stopped": "time_budget"}


def _cell(root: Path, name: str, per_episode: np.ndarray, iterations: int, seconds: float,
          validations: list[tuple[int, float, float]]) -> None:
    """A run folder as `mamlbench train` + `evaluate` leave it: validations are (iteration, seconds, acc)."""
    folder = root / "omniglot" / name
    (folder / "eval").mkdir(parents=True)
    (folder / "train.json").write_text(json.dumps({"iterations": iterations, "seconds": seconds,
                                                   "provenance": _provenance(iterations, seconds)}))
    rows = ["iteration,meta_train/query_loss,meta_val/query_acc"]
    clock = ["iteration,seconds"]
    for i in range(1, iterations + 1):
        val = next((f"{a:.6g}" for it, _, a in validations if it == i), "")
        rows.append(f"{i},1.0,{val}")
        clock.append(f"{i},{seconds * i / iterations:.3f}")
    (folder / "curve.csv").write_text("\n".join(rows) + "\n")
    (folder / "clock.csv").write_text("\n".join(clock) + "\n")
    n = per_episode.size
    (folder / "eval" / "per_episode.csv").write_text("episode,inner_steps,acc\n" + "".join(
        f"{e},{s},{v if s == 1 else 0.2:.6g}\n" for e, v in enumerate(per_episode) for s in (0, 1)))
    mean = float(per_episode.mean())
    (folder / "eval" / "metrics.json").write_text(json.dumps({
        "acc": mean, "ci95": 1.96 * float(per_episode.std()) / math.sqrt(n), "n_episodes": n, "checkpoint": "model.pt",
        "episodes": "omniglot/test/5w1s-600", "ensemble_iterations": None, "provenance": _provenance(iterations, seconds)}))


def test_report_states_result_paper_difference_budget_and_pairing(tmp_path):
    rng = np.random.default_rng(0)
    maml = rng.integers(0, 2, 600).astype(float) * 0.2 + 0.8   # accuracies of 1-query 5-way episodes
    anil = np.clip(maml - 0.2 * (rng.random(600) < 0.1), 0, 1)
    runs = tmp_path / "runs"
    _cell(runs, "maml-5w1s-seed0", maml, 40, 600.0, [(10, 150.0, 0.5), (40, 600.0, 0.9)])
    _cell(runs, "anil-5w1s-seed0", anil, 80, 600.0, [(40, 300.0, 0.6), (80, 600.0, 0.7)])
    (runs / "logs").mkdir()
    (runs / "logs" / "omniglot-maml-5w1s-seed0.log").write_text(
        "# 2026-12-01T10:00:00Z abc1234 load: 1.50 1.20 1.00\ntrained\n# 2026-12-01T10:11:00Z done load: 2.50 2.00 1.50\n")
    out = tmp_path / "report"
    text = build_reference(runs, out).read_text()

    # MAML 5w1s: mean ± 1.96 sd / sqrt(n) in percent, against the paper's 98.7
    mean, ci = 100 * maml.mean(), 196 * maml.std() / math.sqrt(600)
    assert f"**{mean:.2f} ± {ci:.2f}** (paper 98.70; {mean - 98.7:+.2f})" in text
    # ANIL against MAML on the same episodes: the paired mean difference and its CI
    d = anil - maml
    assert f"| {100 * d.mean():+.2f} ± {196 * d.std() / math.sqrt(600):.2f} |" in text
    # budgets: updates reached of the protocol's, minutes, rate
    assert "| MAML | 5w1s | 0 |" in text and "| 40 | 60,000 | 10.0 | 0.07 | time budget | final model | 1.50 → 2.50 |" in text
    assert text.count("| final model | — |") == 1   # ANIL: no log, no load
    # cells of the set not run say so; cells outside the set are a dash
    assert "not run: no session time left for it" in text
    row = next(line for line in text.splitlines() if line.startswith("| ANIL |"))
    assert row.count("| — ") == 3   # 5w5s, 20w1s, 20w5s are not in the set for ANIL
    assert "| iMAML | not run: no session time left for it | — | — | — |" in text
    assert "commit abcdef1234" in text and "iterations reached 40–80 (2 runs stopped by their time budget)" in text
    assert (out / "wall_time.png").stat().st_size > 0

    # a cell evaluated on other episodes is not paired, and says so
    other = runs / "omniglot" / "metasgd-5w1s-seed0"
    _cell(runs, "metasgd-5w1s-seed0", anil, 80, 600.0, [(80, 600.0, 0.7)])
    metrics = json.loads((other / "eval" / "metrics.json").read_text())
    (other / "eval" / "metrics.json").write_text(json.dumps({**metrics, "episodes": "another-set"}))
    assert "| not paired: other episodes |" in build_reference(runs, tmp_path / "with_other").read_text()

    # rebuilt from the copied files alone: the same bytes
    first = ((out / "README.md").read_bytes(), (out / "wall_time.png").read_bytes())
    build_reference(out / "runs", out)
    assert ((out / "README.md").read_bytes(), (out / "wall_time.png").read_bytes()) == first


def test_validation_curve_is_accuracy_at_wall_time(tmp_path):
    _cell(tmp_path, "maml-5w1s-seed0", np.ones(4), 40, 600.0, [(10, 150.0, 0.5), (40, 600.0, 0.9)])
    curve = validation_curve(tmp_path / "omniglot" / "maml-5w1s-seed0")
    assert curve["minutes"].tolist() == [2.5, 10.0] and curve["val_acc"].tolist() == [0.5, 0.9]


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no reference runs"):
        build_reference(tmp_path / "nothing", tmp_path / "out")


def test_each_variant_is_compared_at_matched_time_and_at_matched_updates(tmp_path):
    """Matched time: the paired test difference. Matched updates: validation accuracy at the last update
    both cells validated at, with an unpaired CI from each cell's per-episode test sd; an ordering is
    stated only where both CIs are clear of zero on the same side."""
    rng = np.random.default_rng(1)
    maml = (rng.random(600) < 0.7).astype(float)
    better = np.maximum(maml, (rng.random(600) < 0.5).astype(float))   # beats MAML on the same episodes
    runs = tmp_path / "runs"
    _cell(runs, "maml-5w1s-seed0", maml, 40, 600.0, [(20, 300.0, 0.60), (40, 600.0, 0.70)])
    _cell(runs, "anil-5w1s-seed0", better, 80, 600.0, [(20, 150.0, 0.62), (40, 300.0, 0.71), (80, 600.0, 0.9)])
    _cell(runs, "metasgd-5w1s-seed0", better, 40, 600.0, [(20, 300.0, 0.80), (40, 600.0, 0.95)])
    text = build_reference(runs, tmp_path / "out").read_text()

    n_val = fewshot_cell(load_params(ROOT / "params.yaml", profile="reference"), "omniglot", "maml", "5w1s").train.n_val_episodes
    ci = 196 * math.sqrt(better.var() / n_val + maml.var() / n_val)
    d = better - maml
    paired = f"{100 * d.mean():+.2f} ± {196 * d.std() / math.sqrt(600):.2f}"
    anil = next(line for line in text.splitlines() if line.startswith("| ANIL | 5w1s"))
    assert f"| {paired} | {100 * (0.71 - 0.70):+.2f} ± {ci:.2f} at 40 |" in anil   # the last common validation: 40
    assert "| 80 ⚠ unequal |" in anil                                               # twice MAML's updates
    metasgd = next(line for line in text.splitlines() if line.startswith("| Meta-SGD | 5w1s"))
    assert f"| {paired} | {100 * (0.95 - 0.70):+.2f} ± {ci:.2f} at 40 |" in metasgd and "⚠ unequal" not in metasgd
    assert 100 * d.mean() > 196 * d.std() / math.sqrt(600) and 25 > ci > 1   # the data behind the sentence below
    assert ("Under both matchings: Meta-SGD > MAML. Not under both (no ordering the data supports): "
            "ANIL (> at matched time, tied at matched updates)") in text

    # a protocol that tests another model than MAML's final one is named in the paired column
    metrics = json.loads((runs / "omniglot" / "anil-5w1s-seed0" / "eval" / "metrics.json").read_text())
    (runs / "omniglot" / "anil-5w1s-seed0" / "eval" / "metrics.json").write_text(
        json.dumps({**metrics, "checkpoint": "best.pt"}))
    assert f"| {paired} (best on validation vs MAML's final model) |" in build_reference(runs, tmp_path / "o2").read_text()


def _save_checkpoint(folder: Path, iteration: int, validations: dict[int, float], seconds: float) -> None:
    from mamlbench.io import save_torch
    history = [{"iteration": i, "meta_train/query_loss": 1.0, **({"meta_val/query_acc": validations[i]}
                                                                   if i in validations else {})}
               for i in range(100, iteration + 1, 100)]
    clock = [(row["iteration"], seconds * row["iteration"] / iteration) for row in history]
    save_torch(folder / "checkpoints" / f"ckpt-{iteration:08d}.pt",
               {"iteration": iteration, "history": history, "clock": clock, "seconds": seconds})


def test_full_budget_page_releases_finished_models_and_carries_unfinished_checkpoints(tmp_path):
    from mamlbench.reference import build_full
    runs = tmp_path / "runs"
    done = runs / "omniglot" / "paper_noconv-maml-5w1s-seed0"
    per_episode = np.r_[np.ones(540), np.zeros(60)]               # 90.00% on 600 episodes
    _cell(runs, "x", per_episode, 400, 7200.0, [(200, 3600.0, 0.951), (400, 7200.0, 0.985)])
    (runs / "omniglot" / "x").rename(done)
    train = json.loads((done / "train.json").read_text())
    (done / "train.json").write_text(json.dumps({**train, "provenance": {**train["provenance"], "profile": "paper_noconv"}}))
    (done / "model.pt").write_bytes(b"weights")
    (done / "checkpoints").mkdir()
    (done / "checkpoints" / "ckpt-00000400.pt").write_bytes(b"not carried: the cell is finished")
    going = runs / "omniglot" / "paper-fomaml-5w1s-seed0"
    (going / "checkpoints").mkdir(parents=True)
    _save_checkpoint(going, 200, {100: 0.5}, 60.0)
    _save_checkpoint(going, 300, {100: 0.5, 300: 0.96}, 90.0)
    (runs / "logs").mkdir()
    (runs / "logs" / "paper-fomaml-5w1s-seed0.log").write_text(
        "# 2026-12-08T00:37:12Z start 73836b1 vm (Test CPU) load: 0.60 0.76 0.38 sitting left: 8100s\n")
    out = tmp_path / "full"
    text = build_full(runs, out).read_text()

    finished = next(line for line in text.splitlines() if line.startswith("| fully connected"))
    ci = 196 * per_episode.std() / math.sqrt(600)
    assert f"| 90.00 ± {ci:.2f} | 89.7 ± 1.1 | yes |" in finished         # |90.0 − 89.7| < CI + 1.1
    assert "| 400 of 60,000 ⚠ unfinished |" in finished and "| 2.00 |" in finished
    assert "| 200 | 400 |" in finished                                     # first ≥ 95%, first ≥ 98%
    unfinished = next(line for line in text.splitlines() if "first-order MAML" in line)
    assert "| training | 98.3 ± 0.5 | — | 300 of 60,000 ⚠ unfinished |" in unfinished
    assert "| 300 | — | 73836b1 | Test CPU | 0.60 |" in unfinished
    kept = out / "runs" / "omniglot"
    assert (kept / done.name / "model.pt").read_bytes() == b"weights"
    assert not (kept / done.name / "checkpoints").exists()                 # a finished cell carries no checkpoint
    assert [p.name for p in (kept / going.name / "checkpoints").iterdir()] == ["ckpt-00000300.pt"]
    first = ((out / "README.md").read_bytes(), (out / "curves.png").read_bytes())
    build_full(out / "runs", out)
    assert ((out / "README.md").read_bytes(), (out / "curves.png").read_bytes()) == first
