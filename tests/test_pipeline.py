"""The README's promises: its Python example runs; `dvc repro` in a fresh copy of the repo trains,
evaluates and records metrics in DVC and MLflow, skips what did not change, reruns what did."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert math.isfinite(namespace["out"].loss.item())
    assert namespace["out"].task_losses.shape == (25,)


def _clone(tmp_path: Path) -> Path:
    """The tracked files of the repo (as the working tree has them) in a fresh git repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    repo = tmp_path / "repo"
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    for name in ("dvc.lock",):
        (repo / name).unlink(missing_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], cwd=repo, check=True)
    return repo


def _dvc(repo: Path, *args: str, stdout_only: bool = False) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, f"dvc {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout if stdout_only else out.stdout + out.stderr


@pytest.mark.slow
def test_dvc_repro_sinusoid_end_to_end(tmp_path):
    repo = _clone(tmp_path)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["profiles"]["quick"].update({"sinusoid.train.iterations": 200, "sinusoid.pretrain.iterations": 200})
    params["sinusoid"]["evaluate"]["n_tasks"] = 60
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    log = _dvc(repo, "repro", "sinusoid-evaluate")
    assert "sinusoid-train@maml-0" in log and "sinusoid-evaluate@0" in log
    assert (repo / "runs/sinusoid/seed0/maml/train.json").is_file()
    evaluation = json.loads((repo / "runs/sinusoid/seed0/eval/metrics.json").read_text())
    assert evaluation["maml"]["k10"]["step1"]["mse"] > 0

    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mamlbench-sinusoid")
    found = client.search_runs([experiment.experiment_id])
    assert {r.info.run_name for r in found} == {f"sinusoid-{m}-k10-seed0{e}" for m in ("maml", "pretrain")
                                                for e in ("", "-evaluate")}   # quick: the default profile
    assert all(r.info.status == "FINISHED" and r.data.tags.get("dvc_stage") for r in found)

    again = _dvc(repo, "repro", "sinusoid-evaluate")
    assert "Running stage" not in again

    params["sinusoid"]["evaluate"]["n_tasks"] = 50
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _dvc(repo, "repro", "sinusoid-evaluate")
    assert "Running stage 'sinusoid-evaluate@0'" in changed
    assert "Running stage 'sinusoid-train" not in changed


TINY = {  # every benchmark, seconds each: the pipeline's plumbing, not its numbers
    "sinusoid.train.iterations": 40, "sinusoid.train.checkpoint_every": 20, "sinusoid.train.log_every": 10,
    "sinusoid.pretrain.iterations": 40, "sinusoid.pretrain.checkpoint_every": 20, "sinusoid.pretrain.log_every": 10,
    "omniglot.hidden": 8, "omniglot.train.iterations": 6, "omniglot.train.meta_batch_size": 2,
    "omniglot.train.validate_every": 3, "omniglot.train.n_val_episodes": 10, "omniglot.train.log_every": 3,
    "omniglot.evaluate.inner_steps": 2, "omniglot.evaluate.n_episodes": 20, "omniglot.evaluate.chunk": 20,
    "variants.mamlpp.train.iterations": 6, "variants.mamlpp.options.multi_step_loss_iterations": 3,
    "variants.mamlpp.options.first_order_iterations": 3,
    "rl.navigation.iterations": 2, "rl.navigation.pretrain_iterations": 2, "rl.navigation.meta_batch_size": 2,
    "rl.navigation.n_episodes": 2, "rl.navigation.horizon": 10, "rl.navigation.evaluate.n_tasks": 2,
    "rl.navigation.evaluate.n_episodes": 2, "rl.navigation.evaluate.trace_episodes": 1,
}


@pytest.mark.slow
def test_dvc_repro_tiny_profile_download_to_report(tmp_path, monkeypatch):
    """download -> prepare -> episodize -> train -> evaluate -> report, for every benchmark and two seeds."""
    from conftest import MIRROR
    if not (MIRROR / "omniglot").is_dir():
        pytest.skip(f"no data mirror at {MIRROR}")
    monkeypatch.setenv("MAMLBENCH_DATA_MIRROR", str(MIRROR))
    repo = _clone(tmp_path)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["profile"] = "tiny"
    params["profiles"]["tiny"] = dict(TINY)
    params["seeds"] = [0, 1]
    params["omniglot"]["run"]["algorithms"] = ["maml", "anil"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    log = _dvc(repo, "repro")
    for stage in ("download-omniglot", "episodize-omniglot", "sinusoid-evaluate@1", "omniglot-train@maml-5w1s-1",
                  "omniglot-evaluate@anil-5w1s-0", "rl-evaluate@navigation-1", "report"):
        assert f"Running stage '{stage}'" in log, stage
    # dvc metrics: one small file per cell, kept by git, the test metric named as in MLflow
    shown = json.loads(_dvc(repo, "metrics", "show", "--json", stdout_only=True))
    files = next(iter(shown.values()))["data"]
    for algorithm in ("maml", "anil"):
        for seed in (0, 1):
            cell = files[f"reports/metrics/omniglot/{algorithm}-5w1s-seed{seed}.json"]["data"]
            evaluated = json.loads((repo / f"runs/omniglot/{algorithm}-5w1s-seed{seed}/eval/metrics.json").read_text())
            assert cell["meta_test/acc"] == round(evaluated["acc"], 6)
    assert "meta_test/mse_step10" in files["reports/metrics/sinusoid/maml-k10-seed1.json"]["data"]
    assert "meta_test/return_step1" in files["reports/metrics/rl/navigation-maml-seed0.json"]["data"]
    assert all(not f.startswith("runs/") for f in files)
    html = repo / "plots_html"
    _dvc(repo, "plots", "show", "-o", str(html))
    page = (html / "index.html").read_text()
    assert "<img" in page and "<script" not in page and "http" not in page   # renders offline
    report = (repo / "reports" / "README.md").read_text()
    assert "| maml | 5w1s |" in report and "| anil | 5w1s | mean of 2 |" in report and "### navigation" in report
    figures = {p.name for p in (repo / "reports" / "figures").iterdir()}
    assert {"omniglot_5w1s_curves.png", "sinusoid_mse_steps.png", "rl_navigation_return_steps.png"} <= figures
    ignored = subprocess.run(["git", "check-ignore", "-q", "reports/README.md"], cwd=repo).returncode
    assert ignored == 1, "git, not DVC, keeps the report"
    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    names = {r.info.run_name for r in client.search_runs([client.get_experiment_by_name("mamlbench-omniglot").experiment_id])}
    assert {"omniglot-maml-5w1s-seed0-tiny", "omniglot-anil-5w1s-seed1-tiny",
            "omniglot-maml-5w1s-seed1-tiny-evaluate"} <= names

    snapshot = report
    again = _dvc(repo, "repro")
    assert "Running stage" not in again
    assert (repo / "reports" / "README.md").read_text() == snapshot

    params["sinusoid"]["evaluate"]["n_tasks"] = 40
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _dvc(repo, "repro")
    ran = sorted(re.findall(r"Running stage '([^']+)'", changed))
    assert ran == ["report", "sinusoid-evaluate@0", "sinusoid-evaluate@1"], ran

    # Two experiments on the committed baseline: `dvc exp show` lists both with the headline metric,
    # `dvc metrics diff` the change against HEAD
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny"], cwd=repo, check=True)
    key = "reports/metrics/sinusoid/maml-k10-seed0.json"
    for lr in (0.02, 0.005):   # an evaluation knob: only the evaluations and the report rerun
        ran = re.findall(r"Running stage '([^']+)'", _dvc(repo, "exp", "run", "-S", f"sinusoid.evaluate.inner_lr={lr}"))
        assert sorted(ran) == ["report", "sinusoid-evaluate@0", "sinusoid-evaluate@1"], ran
    shown = json.loads(_dvc(repo, "exp", "show", "--json", stdout_only=True))
    baseline = next(row for row in shown if row.get("experiments"))
    exps = [e["revs"][0]["data"] for e in baseline["experiments"]]
    assert sorted(e["params"]["params.yaml"]["data"]["sinusoid"]["evaluate"]["inner_lr"] for e in exps) == [0.005, 0.02]
    values = [e["metrics"][key]["data"]["meta_test/mse_step1"] for e in exps]
    assert all(v > 0 for v in values) and values[0] != values[1]
    table = _dvc(repo, "exp", "show", "--md", "--drop", ".*", "--keep",   # the README's recipe, one param
                 "Experiment|sinusoid.evaluate.inner_lr|.*maml-k10-seed0.json:meta_test/mse_step1$", stdout_only=True)
    header = table.splitlines()[0]
    assert "sinusoid.evaluate.inner_lr" in header and f"{key}:meta_test/mse_step1" in header and header.count("|") == 4
    assert len([line for line in table.splitlines() if "| 0.005 " in line or "| 0.02 " in line]) >= 2
    diff = json.loads(_dvc(repo, "metrics", "diff", "--json", stdout_only=True))
    assert "meta_test/mse_step1" in diff[key], diff
    params["sinusoid"]["evaluate"]["inner_lr"] = 0.005   # the workspace holds the last experiment

    # The opt-in tune stage: one cell, a few tiny trials, best settings and metrics declared to DVC.
    params["tune"].update(cells=[{"benchmark": "omniglot", "algorithm": "maml", "setting": "5w1s"}], n_trials=3,
                          iterations=2, validate_every=1, n_val_episodes=10, n_startup_trials=1)
    params["rl"]["envs"] = []   # and a pipeline without meta-RL still reports
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tuned = _dvc(repo, "repro")
    ran = sorted(re.findall(r"Running stage '([^']+)'", tuned))
    assert ran == ["report", "tune@0"], ran
    best = yaml.safe_load((repo / "tuned/omniglot-maml-5w1s/params.yaml").read_text())
    assert best["profile"] == "tuned_omniglot_maml_5w1s" and best["profile"] in best["profiles"]
    assert "tuned/omniglot-maml-5w1s/best.json" in _dvc(repo, "metrics", "show", "--json", stdout_only=True)
    assert "### navigation" not in (repo / "reports" / "README.md").read_text()
