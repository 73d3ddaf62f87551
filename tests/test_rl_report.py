"""The meta-RL reference page (`mamlbench rl report`): every number from the run files, MAML's paired
per-task differences computed here from the stored per-task returns, and a rebuild from the copies
byte for byte."""
from __future__ import annotations

import json
import math

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
    page = build_rl_report(out, tmp_path / "root", params).read_text()
    section = page.split("## 2D navigation")[1]
    metrics = json.loads((run / "metrics.json").read_text())
    for policy in ("maml", "pretrained", "random"):
        row = next(line for line in section.splitlines() if line.startswith(f"| {policy} |"))
        for step in range(4):
            v = metrics[policy][f"step_{step}"]
            assert f"{v['mean']:.2f} ± {v['ci95']:.2f}" in row, (policy, step)
    per_task = json.loads((run / "evaluate.json").read_text())["policies"]
    for other in ("pretrained", "random"):   # the paired difference, by hand in float64
        d = np.array(per_task["maml"]["step_1"]["per_task"], dtype=np.float64) - \
            np.array(per_task[other]["step_1"]["per_task"], dtype=np.float64)
        ci = 1.96 * math.sqrt(((d - d.sum() / d.size) ** 2).sum() / d.size) / math.sqrt(d.size)
        wins = int((d > 0).sum())
        assert f"| {other} | step 1 | {d.mean():+.2f} ± {ci:.2f} | {wins}/6 |" in section, other
    assert "| maml | 2 of 500 |" in section and "| pretrained | 2 of 500 |" in section   # profile paper: 500
    assert "13:48 navigation maml 1.72" in section and "14:40 done 2.10" in section
    assert "(navigation/trace.png)" in section and (out / "navigation" / "trace.png").is_file()
    assert not list(out.rglob("*.pt"))   # the page's copies hold no policies

    first = (out / "README.md").read_bytes()
    build_rl_report(out, None, params)   # from the copies alone
    assert (out / "README.md").read_bytes() == first
    assert "Not run yet: `halfcheetah_dir`, `halfcheetah_vel`, `ant_dir`, `ant_vel`." in page
