"""The meta-RL reference page (`mamlbench rl report`): every number from the run files, each CI the
few-shot tables' 1.96 std / sqrt(n) from the stored per-task returns (MAML's paired differences too), the
quick pipeline's outputs beside the runs labelled as such, and a rebuild from the copies byte for byte."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rl_report_tables_pairs_and_rebuild(tmp_path):
    from mamlbench.rl.pipeline import evaluate_env, train_env
    from mamlbench.rl_report import build_rl_report
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"]["enabled"] = False
    raw["rl"]["navigation"] = {"horizon": 10, "hidden": [16, 16], "n_episodes": 2, "meta_batch_size": 2,
                               "iterations": 2, "pretrain_iterations": 2,
                               "evaluate": {"n_tasks": 6, "n_episodes": 2, "trace_episodes": 1}}
    raw["profiles"]["quick"] = {k: v for k, v in raw["profiles"]["quick"].items()   # this test's budget, not quick's
                                if not k.startswith("rl.navigation.")}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    run = tmp_path / "root" / "rl" / "navigation"
    train_env(params, "navigation", run, run / "train-maml.json", models=("maml",))
    train_env(params, "navigation", run, run / "train-pretrained.json", models=("pretrained",))
    evaluate_env(params, "navigation", run, run / "metrics.json", run / "plots")
    (tmp_path / "root" / "logs").mkdir()
    (tmp_path / "root" / "logs" / "rl-navigation.log").write_text(
        "# 2026-12-01T13:48:47Z ef39263 navigation maml load: 1.72 1.39 1.40\nnoise\n"
        "# 2026-12-01T14:40:00Z ef39263 done load: 2.10 2.00 1.90\n")

    out = tmp_path / "reports"
    quick = out / "navigation" / "seed0"   # where dvc.yaml's rl-evaluate stage plots, beside the copies
    quick.mkdir(parents=True)
    for name in ("adaptation.csv", "adaptation.png"):
        shutil.copyfile(run / "plots" / name, quick / name)
    page = build_rl_report(out, tmp_path / "root", params).read_text()
    section = page.split("## 2D navigation")[1]
    metrics = json.loads((run / "metrics.json").read_text())
    per_task = json.loads((run / "evaluate.json").read_text())["policies"]

    def ci95(x: np.ndarray) -> float:   # by hand in float64: 1.96 x the population std / sqrt(n)
        return 1.96 * math.sqrt(((x - x.sum() / x.size) ** 2).sum() / x.size) / math.sqrt(x.size)

    for policy in ("maml", "pretrained", "random"):
        row = next(line for line in section.splitlines() if line.startswith(f"| {policy} |"))
        for step in range(4):
            returns = np.array(per_task[policy][f"step_{step}"]["per_task"], dtype=np.float64)
            assert f"{metrics[policy][f'step_{step}']['mean']:.2f} ± {ci95(returns):.2f}" in row, (policy, step)
            assert abs(ci95(returns) - metrics[policy][f"step_{step}"]["ci95"]) < 1e-9   # one formula everywhere
    assert "1.96 · std / √n with the population std (ddof 0)" in page
    for other in ("pretrained", "random"):   # the paired difference
        d = np.array(per_task["maml"]["step_1"]["per_task"], dtype=np.float64) - \
            np.array(per_task[other]["step_1"]["per_task"], dtype=np.float64)
        wins = int((d > 0).sum())
        assert f"| {other} | step 1 | {d.mean():+.2f} ± {ci95(d):.2f} | {wins}/6 |" in section, other
    quick_section = page.split("## Not these runs: the `quick` pipeline's outputs")[1]
    assert "`navigation/seed0/` (`adaptation.csv`, `adaptation.png`)" in quick_section
    assert "`rl-evaluate@navigation-0`" in quick_section and "seed0" not in page.split("## Not these runs")[0]
    assert "| maml | 2 of 500 |" in section and "| pretrained | 2 of 500 |" in section   # profile paper: 500
    assert "13:48 navigation maml 1.72" in section and "14:40 done 2.10" in section
    assert "(navigation/trace.png)" in section and (out / "navigation" / "trace.png").is_file()
    assert not list(out.rglob("*.pt"))   # the page's copies hold no policies

    first = (out / "README.md").read_bytes()
    build_rl_report(out, None, params)   # from the copies alone
    assert (out / "README.md").read_bytes() == first
    assert "Not run yet: `halfcheetah_dir`, `halfcheetah_vel`, `ant_dir`, `ant_vel`." in page
