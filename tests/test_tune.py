"""Optuna tuning on synthetic episodes: three worker processes share one SQLite study and finish
exactly their trials (none lost, none duplicated), the pruner stops some, every trial is an MLflow
child run of the study's parent run, and the best settings come back as a params file that loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import ROOT, write_params
from mamlbench.config import fewshot_cell, fewshot_train, load_params
from test_fewshot import make_glyphs


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory) -> Path:
    return make_glyphs(tmp_path_factory.mktemp("glyphs"), n_classes=24, per_class=8)


def tiny(tmp_path: Path, **tune) -> Path:
    return write_params(tmp_path / "params.yaml", {
        "profile": "t", "profiles": {"t": {}}, "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "omniglot": {"hidden": 8, "settings": {"5w1s": {"n_way": 5, "k_shot": 1, "n_query": 5}},
                     "train": {"meta_batch_size": 2, "n_query": 5}, "evaluate": {"chunk": 20}},
        "tune": {"iterations": 6, "validate_every": 2, "n_val_episodes": 10, "n_startup_trials": 1,
                 "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
                 # a range wide enough that some trials are clearly worse and get pruned
                 "space": {"inner_lr": [1e-4, 30.0], "inner_steps": [1, 2], "eval_steps": [1, 2]}, **tune},
    })


def _worker(params: Path, glyphs: Path, worker: int, n_trials: int, out: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "mamlbench.cli", "tune", "omniglot", "--params", str(params), "--worker", str(worker),
            "--n-trials", str(n_trials), "--prepared", str(glyphs / "prepared"), "--episodes", str(glyphs / "episodes")]
    if out is not None:
        args += ["--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(args, cwd=params.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_three_workers_share_one_study(tmp_path, glyphs):
    params_path = tiny(tmp_path)
    params = load_params(params_path)
    from mamlbench.tracking import experiment
    experiment(params, "omniglot")   # create the MLflow store once, not three times at once
    workers = [_worker(params_path, glyphs, k, 4, tmp_path / "tuned" if k == 0 else None) for k in range(3)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(logs)

    study = optuna.load_study(study_name="omniglot-maml-5w1s", storage=params.tune.storage)
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(12))      # none lost, none duplicated
    states = [t.state.name for t in trials]
    assert set(states) <= {"COMPLETE", "PRUNED", "FAIL"} and "COMPLETE" in states
    assert "PRUNED" in states, states

    # each trial one MLflow child run of the study's single parent run
    client, experiment_id = experiment(params, "omniglot")
    found = client.search_runs([experiment_id])
    parents = [r for r in found if r.data.tags.get("stage") == "tune" and "optuna_trial" not in r.data.tags]
    children = [r for r in found if "optuna_trial" in r.data.tags]
    assert len(parents) == 1 and study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == list(range(12))
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    pruned = {t.number for t in trials if t.state.name == "PRUNED"}
    assert {int(r.data.tags["optuna_trial"]) for r in children if r.data.tags.get("optuna_state") == "PRUNED"} == pruned


def test_best_settings_file_trains_the_best_trial(tmp_path, glyphs):
    params_path = tiny(tmp_path, pruner="hyperband", n_trials=3)
    out = _worker(params_path, glyphs, 0, 3, tmp_path / "tuned")
    log = out.communicate(timeout=600)[0]
    assert out.returncode == 0, log
    best = json.loads((tmp_path / "tuned" / "best.json").read_text())
    tuned = load_params(tmp_path / "tuned" / "params.yaml")
    cfg = fewshot_train(tuned, "omniglot", "maml", "5w1s")
    assert cfg.inner_lr == pytest.approx(best["params"]["inner_lr"])
    assert cfg.inner_steps == best["params"]["inner_steps"]
    assert fewshot_cell(tuned, "omniglot", "maml", "5w1s").evaluate.inner_steps == best["params"]["eval_steps"]
    assert tuned.profile.startswith("tuned_") and yaml.safe_load((tmp_path / "tuned" / "params.yaml").read_text())
    assert best["dvc_exp_run"].startswith("dvc exp run -S 'variants.maml.omniglot.train.inner_lr=")
    assert len((tmp_path / "tuned" / "trials.csv").read_text().splitlines()) == 4
    # the study itself is kept beside its outputs: optuna-dashboard opens it, the best trial is the same
    import optuna
    kept = optuna.load_study(study_name=best["study"], storage=f"sqlite:///{tmp_path / 'tuned' / 'study.db'}")
    assert len(kept.trials) == 3 and kept.best_trial.number == best["best_trial"]
    assert kept.best_value == best["val_acc"] and kept.best_params == best["params"]


def test_diverging_trial_fails_and_the_study_goes_on(tmp_path, glyphs):
    """An inner step size of 1e8 overflows the loss: that trial ends FAIL, the others still run."""
    params_path = tiny(tmp_path, pruner="none", n_trials=2, space={"inner_lr": [1e30, 1e31], "inner_steps": [1, 1],
                                                                  "eval_steps": [1, 1]})
    from mamlbench.tune import tune
    summary = tune(params_path, "omniglot", "maml", "5w1s", prepared=glyphs / "prepared",
                   episodes_dir=glyphs / "episodes", root=tmp_path)
    assert summary["trials"]["FAIL"] == 2 and summary["best_trial"] is None
