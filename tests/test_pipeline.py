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
    assert "sinusoid-train@maml" in log and "sinusoid-evaluate" in log
    metrics = json.loads(_dvc(repo, "metrics", "show", "--json", stdout_only=True))
    flat = json.dumps(metrics)
    assert "runs/sinusoid/eval/metrics.json" in flat and "runs/sinusoid/maml/train.json" in flat
    evaluation = json.loads((repo / "runs/sinusoid/eval/metrics.json").read_text())
    assert evaluation["maml"]["k10"]["step1"]["mse"] > 0

    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mamlbench-sinusoid")
    found = client.search_runs([experiment.experiment_id])
    assert {r.info.run_name for r in found} == {"maml-seed0", "pretrain-seed0", "evaluate-seed0"}
    assert all(r.info.status == "FINISHED" and r.data.tags.get("dvc_stage") for r in found)

    again = _dvc(repo, "repro", "sinusoid-evaluate")
    assert "Running stage" not in again

    params["sinusoid"]["evaluate"]["n_tasks"] = 50
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _dvc(repo, "repro", "sinusoid-evaluate")
    assert "Running stage 'sinusoid-evaluate'" in changed
    assert "Running stage 'sinusoid-train" not in changed
