"""One MLflow scheme for every benchmark, against a real `mlflow server` on 127.0.0.1: one row per cell
holding its training and test metrics, the evaluation nested under it, the same names everywhere."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import write_params
from mamlbench import runs
from test_faults_runs import free_port
from test_fewshot import VARIANTS, make_glyphs


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--default-artifact-root", (tmp_path / "artifacts").as_uri(), "--workers", "1"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**env, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                break
        except OSError:
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.3)
    yield uri
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_one_row_per_cell_with_train_and_test_metrics_and_the_same_keys(tmp_path, server):
    import mlflow
    glyphs = make_glyphs(tmp_path / "glyphs")
    params = write_params(tmp_path / "params.yaml", {
        "profile": "t", "profiles": {"t": {}}, "tracking": {"uri": server},
        "omniglot": {"hidden": 8, "settings": {"5w1s": {"n_way": 5, "k_shot": 1, "n_query": 5}},
                     "train": {"iterations": 4, "meta_batch_size": 2, "n_query": 5, "validate_every": 2,
                               "n_val_episodes": 10, "checkpoint_every": 2, "log_every": 2},
                     "evaluate": {"inner_steps": 2, "n_episodes": 20, "chunk": 20}},
        "variants": {"mamlpp": {"train": {"inner_lr": 0.4, "inner_steps": 2}, "evaluate": {"inner_steps": 2},
                                "options": {"multi_step_loss_iterations": 2}},
                     "reptile": {"train": {"inner_lr": 0.01, "inner_steps": 2, "iterations": 4},
                                 "evaluate": {"inner_steps": 2}}},
    })
    data = dict(prepared=glyphs / "prepared", episodes_dir=glyphs / "episodes")
    evaluated = {}
    for algorithm in VARIANTS:
        folder = tmp_path / "runs" / f"{algorithm}-5w1s-seed0"
        runs.train_fewshot(params, "omniglot", algorithm, "5w1s", folder, progress=False, **data)
        evaluated[algorithm] = runs.evaluate_fewshot(params, "omniglot", algorithm, "5w1s", folder, folder / "eval",
                                                     **data)

    client = mlflow.tracking.MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name("mamlbench-omniglot")
    rows = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'omniglot-train'")
    assert sorted(r.info.run_name for r in rows) == sorted(f"omniglot-{a}-5w1s-seed0-t" for a in VARIANTS)
    for row in rows:
        algorithm = row.data.tags["variant"]
        assert row.data.metrics["meta_test/acc"] == pytest.approx(evaluated[algorithm]["acc"], rel=1e-12)
        assert "meta_train/query_loss" in row.data.metrics and "meta_val/query_acc" in row.data.metrics
        assert {"setting", "seed", "profile", "device", "mlflow.source.git.commit", "git_dirty"} <= set(row.data.tags)
        assert {"model.pt", "curve.png"} <= {a.path for a in client.list_artifacts(row.info.run_id)}
    # identical param and metric keys across the variants; options are one JSON value
    assert len({tuple(sorted(r.data.params)) for r in rows}) == 1
    assert len({tuple(sorted(r.data.metrics)) for r in rows}) == 1
    options = {r.data.tags["variant"]: json.loads(r.data.params["options"]) for r in rows}
    assert options["maml"] == {} and options["mamlpp"]["multi_step_loss_iterations"] == 2

    # each evaluation nests under its training run and logs the step size it used
    children = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'omniglot-evaluate'")
    parents = {r.info.run_id: r.data.tags["variant"] for r in rows}
    assert sorted(parents[c.data.tags["mlflow.parentRunId"]] for c in children) == sorted(VARIANTS)
    maml = next(c for c in children if c.data.tags["variant"] == "maml")
    assert "run.png" in {a.path for a in client.list_artifacts(maml.info.run_id)}
    assert maml.data.params["evaluate.inner_lr"] == "0.4" and maml.data.metrics["meta_test/checkpoint_iteration"] == 4


@pytest.mark.slow
def test_meta_rl_follows_the_scheme(tmp_path):
    import mlflow
    import yaml
    from conftest import ROOT
    from mamlbench.rl.pipeline import evaluate_env, train_env
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw["rl"]["navigation"] = {"horizon": 10, "hidden": [16, 16], "n_episodes": 2, "meta_batch_size": 2,
                               "iterations": 2, "pretrain_iterations": 2,
                               "evaluate": {"n_tasks": 2, "n_episodes": 2, "trace_episodes": 1}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    train_env(params, "navigation", tmp_path / "runs", tmp_path / "train.json")
    summary = evaluate_env(params, "navigation", tmp_path / "runs", tmp_path / "eval.json", tmp_path / "plots")

    client = mlflow.tracking.MlflowClient(tracking_uri=raw["tracking"]["uri"])
    experiment = client.get_experiment_by_name("mamlbench-rl")
    found = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(found) == {"rl-maml-navigation-seed0", "rl-pretrained-navigation-seed0", "rl-all-navigation-seed0-evaluate"}
    trained = [found[f"rl-{m}-navigation-seed0"] for m in ("maml", "pretrained")]
    assert trained[0].data.params.keys() == trained[1].data.params.keys() and "train.max_kl" in trained[0].data.params
    for run, policy in zip(trained, ("maml", "pretrained")):
        assert "meta_train/return" in run.data.metrics and "returns/post_update" not in run.data.metrics
        for step in range(4):   # the test returns on the policy's own row
            assert run.data.metrics[f"meta_test/return_step{step}"] == pytest.approx(summary[policy][f"step_{step}"]["mean"])
        assert "policy.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"variant", "setting", "stage", "device", "profile"} <= set(run.data.tags)
    assert "random/meta_test/return_step1" in found["rl-all-navigation-seed0-evaluate"].data.metrics
