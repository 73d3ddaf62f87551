"""Divergence: a learning rate that sends the loss to inf stops training with the iteration and the
setting named, fails the MLflow run with the reason as a tag, keeps the last good (finite)
checkpoint, and a rerun of the same configuration stops again at the same place instead of
continuing into NaN."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import cli, write_params
from mamlbench import runs, sinusoid
from mamlbench.config import load_params
from mamlbench.train import Checkpointer, LoopConfig, TrainingDiverged, run_loop

MESSAGE = r"(at|after) iteration (\d+) \(inner_lr=0\.01, meta_lr=3\.0, inner_steps=1\)"


def test_divergence_fails_the_run_keeps_the_last_good_checkpoint_and_a_rerun_stops_again(tmp_path):
    import mlflow

    params = write_params(tmp_path / "params.yaml", {
        "profile": "t", "profiles": {"t": {}}, "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "sinusoid": {"train": {"iterations": 30, "checkpoint_every": 1, "log_every": 1, "meta_batch_size": 5,
                               "inner_lr": 0.01, "meta_lr": 3.0}}})
    run = tmp_path / "run"
    out = cli("train", "sinusoid", "-p", str(params), "--run-dir", str(run), "--no-progress", cwd=tmp_path,
              check=False)
    assert out.returncode == 3 and "Traceback" not in out.stderr
    (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    found = re.search(MESSAGE, line)
    assert found and line.startswith("error: training diverged: sinusoid maml:"), line
    stopped = int(found.group(2))

    ckpts = sinusoid.checkpointer(load_params(params), "maml", run)
    kept = ckpts.latest()
    assert 0 < kept["iteration"] <= stopped + 1
    assert all(bool(torch.isfinite(v).all()) for v in kept["learner"].values() if v.is_floating_point())
    assert not (run / "model.pt").exists() and not (run / "train.json").exists()

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (first,) = client.search_runs([client.get_experiment_by_name("mamlbench-sinusoid").experiment_id])
    assert first.info.status == "FAILED"
    assert re.search(MESSAGE, first.data.tags["failure_reason"])
    assert first.data.tags["failure_reason"].startswith("TrainingDiverged")

    # the same configuration again: it resumes from the kept checkpoint and stops at the same iteration
    with pytest.raises(TrainingDiverged, match=MESSAGE) as err:
        runs.train_sinusoid(params, "maml", run, progress=False)
    assert int(re.search(MESSAGE, str(err.value)).group(2)) == stopped
    assert ckpts.latest()["iteration"] == kept["iteration"] and not (run / "model.pt").exists()
    (again,) = client.search_runs([client.get_experiment_by_name("mamlbench-sinusoid").experiment_id])
    assert again.info.run_id == first.info.run_id and again.info.status == "FAILED"


def test_parameters_turning_nan_under_finite_metrics_are_never_checkpointed(tmp_path):
    """The loss of an iteration is computed before its update: a finite loss can precede NaN weights."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(iteration: int) -> dict[str, float]:
        if iteration == 5:
            with torch.no_grad():
                model.weight.fill_(float("nan"))   # the update of iteration 5 blew up
        return {"loss": 1.0}

    ckpts = Checkpointer(tmp_path / "ckpt", "fp")
    config = LoopConfig(iterations=10, checkpoint_every=3, log_every=1, describe="toy", setting="lr=0.1")
    with pytest.raises(TrainingDiverged, match=r"parameter weight is not finite after iteration 5 \(lr=0\.1\)"):
        run_loop(model, optimizer, step, config, ckpts, progress=False)
    assert [p.name for p in ckpts.paths()] == ["ckpt-00000003.pt"]
    assert bool(torch.isfinite(ckpts.latest()["learner"]["weight"]).all())
