"""`dvc repro` in a fresh clone after a fix to the training code: the stage retrains (it used to find
the old code's finished checkpoint under the same params, train 0 iterations and re-save the old
model), says why in one line, logs progress lines, and records the new code's provenance."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mamlbench.io import load_torch
from test_pipeline import _clone
from test_provenance import edit_training_code

STAGE = "sinusoid-train@maml-0"


def _repro(repo: Path) -> str:
    """`dvc repro STAGE` running the clone's own package (not the one this interpreter has installed)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(repo), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    out = subprocess.run([sys.executable, "-m", "dvc", "repro", STAGE], cwd=repo, capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


@pytest.mark.slow
def test_dvc_repro_retrains_after_a_code_edit(tmp_path):
    repo = _clone(tmp_path)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["profiles"]["quick"].update({"sinusoid.train.iterations": 200, "sinusoid.train.checkpoint_every": 50,
                                        "sinusoid.train.log_every": 10})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "tiny"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    run = repo / "runs" / "sinusoid" / "seed0" / "maml"

    first = _repro(repo)
    assert f"Running stage '{STAGE}'" in first
    progress = [line for line in first.splitlines() if line.startswith("sinusoid maml: ")]
    assert progress[0] == "sinusoid maml: 0/200 (0%), starting" and "200/200 (100%)" in progress[-1], first
    assert all("it/s" in line and "ETA" in line for line in progress[1:])
    old = json.loads((run / "train.json").read_text())["provenance"]
    assert (old["git_commit"], old["git_dirty"], old["iterations"]) == (head, False, 200)
    old_model = load_torch(run / "model.pt")["state_dict"]

    assert "Running stage" not in _repro(repo)  # nothing changed: DVC skips the stage

    # the fix: any change to what the stage computes; DVC reruns the stage, which must not resume
    edit_training_code(repo)
    second = _repro(repo)
    assert f"Running stage '{STAGE}'" in second
    notes = [line for line in second.splitlines() if "starting afresh" in line]
    assert len(notes) == 1 and "its code differs" in notes[0], second
    assert "sinusoid maml: 0/200 (0%), starting" in second and "resumed at" not in second
    new = json.loads((run / "train.json").read_text())["provenance"]
    assert new["code_hash"] != old["code_hash"] and new["settings_hash"] == old["settings_hash"]
    assert (new["resumed_from"], new["iterations"], new["git_dirty"]) == (0, 200, True)
    new_model = load_torch(run / "model.pt")["state_dict"]
    assert not all(torch.equal(old_model[k], new_model[k]) for k in old_model), "the model was retrained"
