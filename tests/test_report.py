"""The report on metrics files the test writes: tables with CIs and the paper's numbers, paired
comparisons with known differences, the mean over seeds, byte-identical output on a re-run; a short
profile's report says it ranks nothing, and its figures compare variants at equal data in fixed colours."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_params
from mamlbench.config import load_params
from mamlbench.report import build_report, paired, paired_files


def _fewshot_cell(folder: Path, acc: np.ndarray, steps: int = 2) -> None:
    """A cell's eval files: per-episode accuracy `acc` at the last step, lower before."""
    (folder / "eval").mkdir(parents=True)
    rows = ["episode,inner_steps,acc"] + [f"{e},{s},{a * (s + 1) / (steps + 1):.6g}" for e, a in enumerate(acc)
                                          for s in range(steps + 1)]
    (folder / "eval" / "per_episode.csv").write_text("\n".join(rows) + "\n")
    ci = 1.96 * acc.std(ddof=1) / np.sqrt(acc.size)
    (folder / "eval" / "metrics.json").write_text(json.dumps({"acc": float(acc.mean()), "ci95": float(ci),
                                                               "n_episodes": int(acc.size),
                                                               "episodes": f"test-{acc.size}"}))
    (folder / "eval" / "steps.csv").write_text("inner_steps,acc,ci95\n" + "".join(
        f"{s},{acc.mean() * (s + 1) / (steps + 1):.6g},{ci:.6g}\n" for s in range(steps + 1)))
    (folder / "curve.csv").write_text("iteration,meta_train/query_loss,meta_train/query_acc,meta_val/query_acc\n"
                                      "10,1.0,0.5,\n20,0.8,0.6,0.55\n30,0.6,0.7,\n40,0.5,0.8,0.7\n")


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, Path]:
    params = write_params(tmp_path / "params.yaml", {
        "seeds": [0, 1],
        "omniglot": {"run": {"algorithms": ["maml", "anil"], "settings": ["5w1s"]}},
        "rl": {"envs": ["navigation"]}})
    g = np.random.default_rng(0)
    runs = tmp_path / "runs"
    for seed in (0, 1):
        base = g.choice([0.6, 0.8, 1.0], size=50)
        _fewshot_cell(runs / "omniglot" / f"maml-5w1s-seed{seed}", base)
        _fewshot_cell(runs / "omniglot" / f"anil-5w1s-seed{seed}", base - 0.1 * (seed + 1))  # anil: -10, -20 points
        ev = runs / "sinusoid" / f"seed{seed}" / "eval"
        ev.mkdir(parents=True)
        (ev / "metrics.json").write_text("{}")
        lines = ["model,k_shot,inner_steps,task,mse"]
        for model, scale in (("maml", 0.5), ("pretrain", 2.0)):
            lines += [f"{model},{k},{s},{t},{scale * (1 + t % 3) / (s + 1):.6g}" for k in (5, 10) for s in (0, 1)
                      for t in range(20)]
        (ev / "per_task.csv").write_text("\n".join(lines) + "\n")
        rl = {p: {f"step_{s}": {"mean": -40.0 + (10 * s if p == "maml" else s) + seed, "ci95": 2.0} for s in range(4)}
              for p in ("maml", "pretrained", "random")}
        (tmp_path / "runs" / "rl" / "navigation" / f"seed{seed}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs" / "rl" / "navigation" / f"seed{seed}" / "metrics.json").write_text(json.dumps(rl))
    return tmp_path, params


def test_paired_difference_and_ci():
    a, b = np.array([1.0, 0.8, 0.6, 1.0]), np.array([0.8, 0.8, 0.4, 0.6])
    d = paired(a, b)
    diff = a - b
    assert d["diff"] == pytest.approx(diff.mean())
    assert d["ci95"] == pytest.approx(1.96 * diff.std(ddof=0) / 2)  # the reference's formula (cbfinn/maml main.py:201)
    assert (d["a_wins"], d["b_wins"], d["ties"]) == (3, 0, 1)
    with pytest.raises(ValueError, match="same episodes"):
        paired(a, b[:3])


def test_report_tables_paired_comparisons_and_determinism(synthetic):
    root, params_path = synthetic
    params = load_params(params_path)
    written = build_report(params, root / "runs", root / "reports")
    text = (root / "reports" / "README.md").read_text()
    # a quick report says first that it ranks nothing and where the protocol numbers are
    assert text.splitlines()[4].startswith("**A smoke run: profile `quick`'s budgets rank nothing.**")
    assert "(reference/README.md)" in text.splitlines()[4] and "60,000" in text.splitlines()[4]
    # one table per benchmark, the paper's number beside ours as context, no difference at smoke budgets
    assert "ours − paper" not in text
    for heading in ("## Sinusoid regression", "## Omniglot", "## mini-ImageNet", "### navigation"):
        assert heading in text
    maml_row = next(line for line in text.splitlines() if line.startswith("| maml | 5w1s"))
    assert "98.70 ± 0.40" in maml_row and "| 2 |" in maml_row          # paper number, two seeds
    assert text.split("| anil | 5w1s")[1].splitlines()[0].endswith("| — |")   # no published ANIL Omniglot number
    # paired against MAML on the same episodes: exactly -10 and -20 points, mean -15
    assert "| anil | 5w1s | 0 | -10.00 ± 0.00 | 0 / 50 / 0 |" in text
    assert "| anil | 5w1s | 1 | -20.00 ± 0.00 | 0 / 50 / 0 |" in text
    assert "| anil | 5w1s | mean of 2 | -15.00 ±" in text
    # budgets side by side: meta-updates (params' 300 each), tasks seen (x meta-batch 16), training time
    quick = load_params(params_path).omniglot.train
    tasks = f"{quick.iterations * quick.meta_batch_size:,}"
    assert f"| {quick.iterations} / {quick.iterations} | {tasks} / {tasks} | 0 / 0 |" in text
    # the sinusoid's paired MSE difference: maml is 4x smaller on every task
    assert "maml − pretrain, paired" in text
    figures = sorted(p.name for p in (root / "reports" / "figures").iterdir())
    assert figures == ["omniglot_5w1s_curves.png", "omniglot_5w1s_steps.png", "rl_navigation_return_steps.png",
                       "sinusoid_mse_steps.png"]
    before = {p: p.read_bytes() for p in written}
    again = build_report(params, root / "runs", root / "reports")
    assert again == written and all(p.read_bytes() == before[p] for p in again)
    for seed, seconds in ((0, 90.0), (1, 60.0)):   # anil trained 1.5x and 1.0x MAML's 60 s
        for name, wall in ((f"anil-5w1s-seed{seed}", seconds), (f"maml-5w1s-seed{seed}", 60.0)):
            (root / "runs" / "omniglot" / name / "train.json").write_text(json.dumps({"provenance": {"wall_seconds": wall}}))
    build_report(params, root / "runs", root / "reports2")
    text = (root / "reports2" / "README.md").read_text()
    assert "| 90 / 60 ⚠ unequal |" in text and "| 60 / 60 |" in text


def test_paired_files_refuses_different_episodes(synthetic):
    root, _ = synthetic
    a = root / "runs" / "omniglot" / "maml-5w1s-seed0" / "eval"
    short = root / "short"
    short.mkdir()
    (short / "per_episode.csv").write_text("episode,inner_steps,acc\n0,0,1\n")
    (short / "metrics.json").write_text(json.dumps({"episodes": "test-1"}))
    assert paired_files(a, a)["diff"] == 0
    with pytest.raises(ValueError, match="same episodes"):
        paired_files(a, short)


def test_a_paper_profile_report_sets_each_cell_against_the_paper(synthetic):
    root, params_path = synthetic
    paper = write_params(root / "paper.yaml", {"profile": "paper"}, base=params_path)
    text = build_report(load_params(paper), root / "runs", root / "reports")[0].read_text()
    assert "smoke run" not in text and "| ours − paper |" in text
    maml_row = next(line for line in text.splitlines() if line.startswith("| maml | 5w1s"))
    mean = float(maml_row.split(" | ")[5].split(" ± ")[0])   # the mean over the two seeds
    assert maml_row.endswith(f"| 98.70 ± 0.40 | {mean - 98.7:+.2f} |")


@pytest.fixture
def four_variants(tmp_path: Path) -> tuple[Path, Path]:
    """MAML (16 tasks per update), ANIL, ProtoNet (one episode per update) and the baseline, whose
    meta-training accuracy is over every training class."""
    params = write_params(tmp_path / "params.yaml", {
        "seeds": [0], "omniglot": {"run": {"algorithms": ["maml", "anil", "protonet", "baseline"], "settings": ["5w1s"]}},
        "rl": {"envs": []}})
    acc = np.random.default_rng(1).choice([0.6, 0.8, 1.0], size=50)
    for algorithm in ("maml", "anil", "protonet", "baseline"):
        _fewshot_cell(tmp_path / "runs" / "omniglot" / f"{algorithm}-5w1s-seed0", acc)
    baseline = tmp_path / "runs" / "omniglot" / "baseline-5w1s-seed0" / "curve.csv"
    baseline.write_text(baseline.read_text().replace(",0.5,", ",0.001,").replace(",0.6,", ",0.002,"))
    return tmp_path, params


def test_figures_compare_variants_at_equal_data_in_fixed_colours(four_variants, monkeypatch):
    import matplotlib.colors as mcolors
    from mamlbench import report
    from mamlbench.config import VariantsParams, fewshot_train
    drawn = {}
    monkeypatch.setattr(report, "save_figure", lambda fig, path: drawn.__setitem__(path.name, fig))
    root, params_path = four_variants
    params = load_params(params_path)
    report.build_report(params, root / "runs", root / "reports")
    curves, steps = drawn["omniglot_5w1s_curves.png"], drawn["omniglot_5w1s_steps.png"]
    val_ax, train_ax = curves.axes

    def by_colour(ax):
        return {mcolors.to_hex(line.get_color()): line for line in ax.get_lines()}

    colour = {a: mcolors.to_hex(report.variant_style(a)["color"]) for a in ("maml", "anil", "protonet", "baseline")}
    # x: training tasks seen, meta-updates x the cell's meta-batch (16 for MAML here, one episode for ProtoNet)
    for algorithm in colour:
        per_update = fewshot_train(params, "omniglot", algorithm, "5w1s").meta_batch_size
        assert list(by_colour(val_ax)[colour[algorithm]].get_xdata()) == [20 * per_update, 40 * per_update]
    assert fewshot_train(params, "omniglot", "maml", "5w1s").meta_batch_size > 1
    assert list(by_colour(val_ax)[colour["protonet"]].get_xdata()) == [20, 40]
    assert "baseline: one batch of 15 images = 1 task" in curves.get_supxlabel()   # 5 x (1 + 2) images
    # the baseline's 1,100-way training accuracy is not drawn on the N-way axis; the others' are
    assert colour["baseline"] not in by_colour(train_ax) and len(train_ax.get_lines()) == 3
    assert "baseline not drawn" in train_ax.get_title()
    assert val_ax.get_ylim() == train_ax.get_ylim()
    # one colour per variant, the same in both figures, from a fixed map: twelve distinct colours and markers
    assert {a: mcolors.to_hex(line.get_color()) for a, line in
            zip((t.get_text() for t in steps.axes[0].get_legend().get_texts()), steps.axes[0].get_lines())} == colour
    styles = [report.variant_style(f.name) for f in __import__("dataclasses").fields(VariantsParams)]
    assert len({mcolors.to_hex(s["color"]) for s in styles}) == len({s["marker"] for s in styles}) == len(styles) == 12
    # legends off the data: outside every axes
    for fig, legend in ((curves, curves.legends[0]), (steps, steps.axes[0].get_legend())):
        fig.canvas.draw()
        box = legend.get_window_extent()
        assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)


def test_rl_table_ci_is_the_few_shot_formula_over_the_test_tasks(tmp_path):
    """metrics.json's ci95 is a Student-t interval; the report prints 1.96 std / sqrt(n) (ddof 0) from the
    per-task returns in evaluate.json, as every few-shot table, and no CI where those are missing."""
    params = write_params(tmp_path / "params.yaml", {"seeds": [0], "omniglot": {"run": {"algorithms": []}},
                                                     "rl": {"envs": ["navigation"]}})
    folder = tmp_path / "runs" / "rl" / "navigation" / "seed0"
    folder.mkdir(parents=True)
    per_task = {p: {f"step_{s}": [-40.0 + s + d for d in (-1.0, 1.0, -2.0, 2.0)] for s in range(2)}
                for p in ("maml", "pretrained", "random")}
    (folder / "metrics.json").write_text(json.dumps(
        {p: {k: {"mean": float(np.mean(v)), "ci95": 9.99} for k, v in steps.items()} for p, steps in per_task.items()}))
    (folder / "evaluate.json").write_text(json.dumps(
        {"env": "navigation", "policies": {p: {k: {"mean": float(np.mean(v)), "ci95": 9.99, "per_task": v}
                                               for k, v in steps.items()} for p, steps in per_task.items()}}))
    text = build_report(load_params(params), tmp_path / "runs", tmp_path / "reports")[0].read_text()
    ci = 1.96 * np.std([-1.0, 1.0, -2.0, 2.0]) / 2   # 1.55
    assert f"| maml | -40.00 ± {ci:.2f} | -39.00 ± {ci:.2f} |" in text and "9.99" not in text
    (folder / "evaluate.json").unlink()
    text = build_report(load_params(params), tmp_path / "runs", tmp_path / "reports2")[0].read_text()
    assert "| maml | -40.00 | -39.00 |" in text
